"""The batch-mixing analysis (``fxdp/passes/batch_mixing/``) op by op: the tag
algebra, permutations within a sample, an op the analysis cannot process (an error,
never a pass), optional mask arguments, declared semantics of known functions. The
catalogs of mixing and clean models: test_pass_batch_mixing_catalog.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from fxdp.passes import batch_mixing as bm
from oracle import line_of

pytestmark = pytest.mark.usefixtures("quiet")


# -- the tag algebra -----------------------------------------------------------------------------------

def test_tag_algebra():
    a = torch.tensor([1, 2, 0])
    assert bm.combine(a, torch.tensor(0)).tolist() == [1, 2, 0]
    assert bm.combine(a, torch.tensor([1, 1, 3])).tolist() == [1, bm.MIX, 3]
    assert bm.reduce(torch.tensor([[1, 1], [2, 0]]), [1], keepdim=False).tolist() == [1, 2]
    assert bm.reduce(torch.tensor([[1, 1], [2, 0]]), [0], keepdim=False).tolist() == [bm.MIX, 1]
    assert bm.uniform(bm.const((3, 4))) == bm.NO and bm.uniform(a) is None
    ideal = bm.ideal((2, 3), 1, 3)
    assert bm.is_clean(ideal, 1, 3) and not bm.is_clean(ideal, 0, 3) and bm.is_clean(ideal.flatten(), ("fold", 0, 2), 3)
    assert not bm.is_clean(ideal.flip(1), 1, 3)
    an = bm.BatchMixingAnalysis.__new__(bm.BatchMixingAnalysis)
    x = bm.ideal((3, 4), 0, 3)  # [B, k]
    w = bm.const((4, 5))
    assert bm.is_clean(an._einsum_tags("bk,kn->bn", [x, w], (3, 5)), 0, 3)
    assert not bm.is_clean(an._einsum_tags("bk,bn->kn", [x, x[:, :1].expand(3, 5)], (4, 5)), None, 3)


class ChunkCat(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, h):
        return self.fc(torch.cat(h.chunk(3, 1), 1))  # a permutation within each sample


class ShiftedRows(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        return h.repeat(2, 1)[1:h.shape[0] + 1]  # row i is sample i+1's


def test_cat_of_chunks_within_a_sample_is_clean():
    r = fxdp.check(ChunkCat(), (torch.randn(5, 6),))
    assert r.ok and not r.errors, str(r)


def test_an_op_the_analysis_cannot_process_is_an_error_not_a_pass():
    """Fail closed: an internal analysis failure must not leave report.ok True."""
    r = fxdp.check(ShiftedRows(), (torch.randn(5, 4),))
    assert not r.ok
    assert [f.code for f in r.errors] == ["analysis-error"]
    assert r.errors[0].line == line_of(ShiftedRows, "repeat(2, 1)")


class SDPAOptionalMask(nn.Module):
    """timm's Attention: the mask is a forward argument that defaults to None."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x, attn_mask=None):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).sum(1)


def test_attention_with_a_mask_argument_holding_none_is_analysed():
    r = fxdp.check(SDPAOptionalMask(), (torch.randn(3, 5, 8),))
    assert r.ok and not r.findings, str(r)


def test_torchvision_stochastic_depth_is_known_per_sample():
    def stochastic_depth(x, p, mode, training=True):  # stands for torchvision.ops.stochastic_depth
        return x

    stochastic_depth.__module__ = "torchvision.ops.stochastic_depth"
    assert bm.semantics_for(stochastic_depth) == "dim0"
