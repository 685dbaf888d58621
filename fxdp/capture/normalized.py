"""Per-channel normalized weights: the Jacobian's closed form, found and checked by probes.

Weight standardization (Qiao et al. 2019; NF-ResNets, Brock et al. 2021; the DP WideResNets of
De et al. 2022) and weight normalization (Salimans & Kingma 2016) compute an op's weight row by
row from a direction ``V`` and an optional gain ``γ``: ``W_o = γ_o φ(V_o)``, with ``φ`` centering
the row (standardization) or not (normalization) and dividing by a function of its norm. Then,
per output channel ``o`` (``n`` entries a row, ``u_o`` the unit row of ``P V_o``, ``P`` the
centering, or the identity):

    J_V^T g = c_o (g - a mean(g) - β_o u_o (u_o · g))        (a = 1 centered, 0 not)
    J_γ^T g = κ_o (u_o · g)

and sample i's squared norm of ``J_V^T G_i`` is, ``u_o ⊥ 1`` when centered,

    Σ_o c_o² (‖G_io‖² - a (1 · G_io)² / n - (2 β_o - β_o²) (u_o · G_io)²)

(BN-form standardization: ``c = γ/s``, ``β = ‖x̂‖²/n``; ``(x - μ)/(σ + ε)``: ``c = γ/(σ + ε)``,
``β = σ/(σ + ε)``; weight normalization: ``c = γ/‖V‖``, ``β = 1``, uncentered). ``c``, ``β``, ``κ``
are read off one vector-Jacobian product of the weight's own computation and the form is then
checked on a second, Gaussian, cotangent, every step: a linear map that differs from the form
differs on a Gaussian vector with probability one, so a computation of any other shape is
never served by it (it takes the materialized path instead)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["NormalizedWeight", "probe_normalized"]


@dataclass
class NormalizedWeight:
    """``J_V^T g = c (g - a mean(g) - β u (u · g))`` and ``J_γ^T g = κ (u · g)`` per output channel
    (rows of ``[O, n]``), as checked at the current parameters."""

    c: Tensor  # [O]
    beta: Tensor  # [O]
    u: Tensor  # [O, n], unit rows (zero where the direction is)
    centered: bool
    kappa: Optional[Tensor]  # [O], the gain's; None without a gain

    @property
    def n(self) -> int:
        return self.u.shape[1]

    def apply(self, g: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """``(J_V^T g, J_γ^T g)`` by the form for a weight-shaped ``g`` (a clipped sum: the norms
        and the sum then take one linear map, so each sample's term is at most the bound)."""
        rows = g.reshape(self.u.shape).to(self.u.dtype)
        out = torch.mul(self.u, rows)
        ug = out.sum(1)
        torch.addcmul(rows, self.u, (self.beta * ug)[:, None], value=-1, out=out)  # the products' memory
        if self.centered:
            out.sub_(rows.mean(1, keepdim=True))
        out.mul_(self.c[:, None])
        return out.reshape(g.shape).to(g.dtype), (None if self.kappa is None else self.kappa * ug)

    def sq_norm_correction(self, ones_dot: Optional[Tensor], u_dot: Tensor) -> Tensor:
        """``Σ_o c_o² (a (1 · G_io)² / n + (2 β_o - β_o²) (u_o · G_io)²)`` ``[B]`` from the
        per-sample, per-channel dots ``[B, O]``: what the form removes from ``‖c G_i‖²``."""
        w = (self.c * self.c) * (2 * self.beta - self.beta * self.beta)
        out = (u_dot * u_dot) @ w
        if self.centered:
            out = out + (ones_dot * ones_dot) @ (self.c * self.c / self.n)
        return out


def _unit_rows(t: Tensor) -> Tensor:
    """``t``'s rows scaled to unit norm (zero rows stay zero), in place."""
    norm = torch.linalg.vector_norm(t, dim=1, keepdim=True)
    return t.mul_(torch.where(norm > 0, 1 / norm.clamp_min(torch.finfo(t.dtype).tiny), 0))


def probe_normalized(
    vjp: Callable[[Tensor], Tuple[Tensor, Optional[Tensor]]], V: Tensor, has_gain: bool,
    generator: Optional[torch.Generator] = None, first: bool = True,
) -> Optional[NormalizedWeight]:
    """The form of ``W = f(V, γ)`` at these parameters (``vjp(g)``: ``(J_V^T g, J_γ^T g)``, the
    latter ``[O]``, ``None`` without a gain), or ``None`` when neither the centered nor the
    uncentered form holds on a Gaussian cotangent (to ``10 sqrt(eps)`` of the dtype, per channel;
    ``first``: the form tried first, centered or not).

    The cotangents are outer products ``ξ t^T`` (``ξ ~ N(0, I_O)``, ``t ~ N(0, I_n)``): ``O + n``
    Gaussian numbers, not ``O n`` (the draw would cost more than the step's VJPs), and still
    ``D (ξ t^T) = 0`` for a nonzero linear map ``D`` only on a null set (a nonzero polynomial
    in ``(ξ, t)``), channel-mixing maps included."""
    O = V.shape[0]
    rows = V.detach().reshape(O, -1)
    dtype, dev, n = rows.dtype, rows.device, rows.shape[1]
    tol, tiny = 10 * torch.finfo(dtype).eps ** 0.5, torch.finfo(dtype).tiny

    def gauss(*shape: int) -> Tensor:
        return torch.randn(shape, dtype=dtype, device=dev, generator=generator)

    for centered in (first, not first):
        u = _unit_rows(rows - rows.mean(1, keepdim=True) if centered else rows.clone())
        # determination: r_o = t - (u_o · t) u_o is ⊥ {1, u_o}, so J^T r = c r, J^T u = c (1 - β) u,
        # and u · (r + u) = 1 gives the gain's κ; one product of q = r + u
        t = gauss(n)
        if centered:
            t = t - t.mean()
        alpha = u @ t
        q = torch.addcmul(t.expand_as(u), u, (1 - alpha)[:, None])
        jv, jg = vjp(q.reshape(V.shape))
        jv = jv.reshape(O, -1)
        jt = jv @ t
        a2 = torch.mul(u, jv, out=q).sum(1)  # q is spent: its memory holds the products
        c = (jt - alpha * a2) / (t @ t - alpha * alpha).clamp_min(tiny)
        beta = torch.where(c != 0, 1 - a2 / torch.where(c != 0, c, 1), 0)
        if has_gain != (jg is not None):
            return None
        kappa = None if jg is None else jg.reshape(O)
        del jv
        # the check: an independent Gaussian cotangent s = ξ t2^T against the form's
        # c (ξ t2c - β b u), b = u · s; the residual formed in q's memory (q is spent)
        xi, t2 = gauss(O), gauss(n)
        sv, sg = vjp(torch.mul(xi[:, None], t2, out=q).reshape(V.shape))
        t2c = t2 - t2.mean() if centered else t2
        ut = u @ t2
        b = xi * ut
        # sv may be a view of s, in q: each element is read before it is written
        res = torch.addcmul(sv.reshape(O, -1), (c * xi)[:, None], t2c.expand_as(u), value=-1, out=q)
        res.addcmul_(u, (c * beta * b)[:, None])
        scale = (c * xi).abs() * torch.linalg.vector_norm(t2c)
        ok = bool((torch.linalg.vector_norm(res, dim=1) <= tol * scale + tiny).all())
        if ok and kappa is not None:
            # against the gain's own scale, |κ ξ| (1 + |u · t2|): |b| alone can be near zero by chance
            # in some channel while the sum's rounding is not
            sg = sg.reshape(O)
            ok = bool(((sg - kappa * b).abs() <= tol * (kappa * xi).abs() * (1 + ut.abs()) + tiny).all())
        if ok:
            return NormalizedWeight(c=c, beta=beta, u=u, centered=centered, kappa=kappa)
    return None
