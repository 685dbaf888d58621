"""``import opacus.X`` imports ``fxdp.X``: the alias the Opacus-compatibility tests install in
their subprocesses (``python -c`` text, prepended to each runner script)."""

ALIAS = '''
import importlib, importlib.abc, importlib.util, sys

class OpacusIsFxdp(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """import opacus.X -> the module fxdp.X"""
    def find_spec(self, name, path=None, target=None):
        if name == "opacus" or name.startswith("opacus."):
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return importlib.import_module("fxdp" + spec.name[len("opacus"):])

    def exec_module(self, module):
        pass
'''
