"""Per-sample rule for ``rnn_scan``, the recurrence of the DP recurrent layers.

The recurrent weights are used once per step, always on the state the previous
step produced, so their per-sample gradients are sums over time of outer products
(the sequence-linear rule; Goodfellow 2015 for the outer products, BPTT (Werbos
1990) for the gate gradients): with ``dG [B, T, G]`` the gradients of the hh
pre-activations and ``H_prev [B, T, P]`` the state each step saw,

    grad W_hh_i = sum_t dG_{i,t} h_{i,t-1}^T  = bmm(dG^T, H_prev)[i]
    grad b_hh_i = sum_t dG_{i,t}
    grad W_hr_i = sum_t dh_{i,t} u_{i,t}^T     (LSTM projection, u = o * tanh(c))

one batched op per weight, not one capture per step. ``dG`` comes from the
scan's autograd backward, which the capture op runs just before this rule (for
the gradients of the input gates and initial states) and which leaves it on the
call's ``ScanTape``; when no input needed a gradient that backward did not run
and the rule runs the BPTT itself.
"""
from __future__ import annotations

from typing import Any, Dict, FrozenSet, Mapping, Tuple

import torch
from torch import Tensor

from ..layers.recurrent import ScanTape, _mask, _prev_states, _scan_backward, _scan_forward, rnn_scan, rnn_scan_op
from .base import PerSampleRule, register_rule, sq_norms


@register_rule(rnn_scan)
class RecurrentScanRule(PerSampleRule):
    name = "recurrent_scan"
    param_args = ("weight_hh", "bias_hh", "weight_hr")
    input_arg = None  # the scan's tensors are batch-first by construction

    def signature(self, gates_x, weight_hh, bias_hh=None, h0=None, c0=None, weight_hr=None, lengths=None,
                  tape=None, mode="LSTM", reverse=False):  # noqa: D401 - binding only
        pass

    def _grads(self, args: Mapping[str, Any], grad_output: Tensor) -> tuple:
        tape = args.get("tape")
        if isinstance(tape, ScanTape) and tape.grads is not None and tape.saved is not None:
            sv, gr = tape.saved, tape.grads
        else:  # the scan's backward did not run: BPTT here
            sv = tape.saved if isinstance(tape, ScanTape) else None
            if sv is None:
                gx = args["gates_x"]
                with torch.no_grad():
                    sv = _scan_forward(gx, args["weight_hh"], args.get("bias_hh"), args.get("h0"), args.get("c0"),
                                       args.get("weight_hr"), _mask(args.get("lengths"), gx.shape[0], gx.shape[1],
                                                                    gx.device), args["mode"], args["reverse"])
            with torch.no_grad():
                gr = _scan_backward(sv, grad_output)
        if isinstance(tape, ScanTape):
            tape.clear()  # free the saved states as soon as they are used
        return sv, gr

    def _grads_kept(self, args: Mapping[str, Any], grad_output: Tensor) -> tuple:
        """``_grads`` for a direct :meth:`clipped_sum` call, which may follow another
        read of the same record: the tape is refilled instead of left cleared."""
        tape = args.get("tape")
        if isinstance(tape, ScanTape) and tape.grads is not None and tape.saved is not None:
            return tape.saved, tape.grads
        sv, gr = self._grads(args, grad_output)
        if isinstance(tape, ScanTape):
            tape.saved, tape.grads = sv, gr
        return sv, gr

    def norm_sample_sq(self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]) -> Dict[str, Tensor]:
        return self.norm_sample_sq_keep(args, grad_output, needs)[0]

    def bk_plan(self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]) -> Dict[str, str]:
        return {n: ("per-sample Σ_t dG ([B, 4H])" if n.startswith("bias") else
                    "materialized [B, 4H, H] from the scan's BPTT (no tape kept), reused for the clipped sum")
                for n in needs}

    def bk_keeps(self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]) -> bool:
        return True

    def norm_sample_sq_keep(
        self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]
    ) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
        """The per-sample recurrent gradients (``[B, 4H, H]``, far smaller than the
        tape's ``[B, T, 4H]``) are materialized for the norms and kept for the
        clipped sum, which then needs neither the tape nor another matmul."""
        kept = self.grad_sample(args, grad_output, needs)  # reading the tape frees it
        return {k: sq_norms(v) for k, v in kept.items()}, kept

    def clipped_sum(
        self, args: Mapping[str, Any], grad_output: Tensor, factors: Tensor, needs: FrozenSet[str]
    ) -> Dict[str, Tensor]:
        """``sum_i c_i grad W_i = (c * dG)^T H_prev`` over all (sample, step) rows: one matmul."""
        sv, gr = self._grads_kept(args, grad_output)
        f = factors.to(gr["dG"].dtype).view(-1, 1, 1)
        dG = gr["dG"] * f
        out: Dict[str, Tensor] = {}
        if "weight_hh" in needs:
            H = _prev_states(sv)
            out["weight_hh"] = dG.reshape(-1, dG.shape[-1]).t() @ H.reshape(-1, H.shape[-1])
        if "bias_hh" in needs:
            out["bias_hh"] = dG.sum((0, 1))
        if "weight_hr" in needs:
            dH, U = gr["dHt"] * f, sv["U"]
            out["weight_hr"] = dH.reshape(-1, dH.shape[-1]).t() @ U.reshape(-1, U.shape[-1])
        return out  # the tape dies with the backward record

    def grad_sample(self, args: Mapping[str, Any], grad_output: Tensor, needs: FrozenSet[str]) -> Dict[str, Tensor]:
        sv, gr = self._grads(args, grad_output)
        dG = gr["dG"]
        out: Dict[str, Tensor] = {}
        if "weight_hh" in needs:
            out["weight_hh"] = torch.bmm(dG.transpose(1, 2), _prev_states(sv))
        if "bias_hh" in needs:
            out["bias_hh"] = dG.sum(1)
        if "weight_hr" in needs:
            out["weight_hr"] = torch.bmm(gr["dHt"].transpose(1, 2), sv["U"])
        return out


@register_rule(rnn_scan_op._opoverload)
class ExportedRecurrentScanRule(RecurrentScanRule):
    """``fxdp::rnn_scan`` of the ``torch.export`` graph: the same rule without a tape
    (the BPTT is rerun from the recorded inputs and output gradient)."""

    def signature(self, gates_x, weight_hh, bias_hh=None, h0=None, c0=None, weight_hr=None, lengths=None,
                  mode="LSTM", reverse=False):  # noqa: D401 - binding only
        pass
