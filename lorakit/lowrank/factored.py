"""Exact SVD of a sum of low-rank products, from the factors alone.

``M = sum_i c_i B_i A_i = B A`` with ``B = [c_1 B_1, ..., c_k B_k]`` ``(out, R)`` and
``A = [A_1; ...; A_k]`` ``(R, in)``. With the small Gram matrices ``B^T B = V_b L_b V_b^T`` and
``A A^T = V_a L_a V_a^T`` (``R x R``), ``B = Q_b (L_b^1/2 V_b^T)`` and ``A = (V_a L_a^1/2) Q_a^T``
with orthonormal ``Q_b = B V_b L_b^-1/2`` and ``Q_a = A^T V_a L_a^-1/2``. The core
``C = L_b^1/2 V_b^T V_a L_a^1/2`` is ``R x R``; its SVD ``C = U_c S V_c^T`` gives
``M = (Q_b U_c) S (Q_a V_c)^T``. (Implemented with the equivalent ``eigh`` of
``L_b^1/2 V_b^T (A A^T) V_b L_b^1/2``, which avoids the second whitening and the core SVD.) Cost: two ``R x R`` Gram products per factor, two small
decompositions and two skinny back-projections, ``O((out + in) R^2)``, instead of the
``O(out * in * min(out, in))`` dense SVD. Directions with Gram eigenvalues below
``GRAM_RTOL * max`` (rank-deficient or all-zero factors) are dropped, so no NaN appears.

The tall products run in ``work_dtype`` (float32 by default, on CUDA when asked); the small
decompositions always run in float64. Errors from float32 Gram products perturb the singular
subspaces only to second order in the truncation error (it is stationary at the optimum).

Example:
    >>> import torch
    >>> b, a = torch.randn(6, 2, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    >>> svd = factored_svd([b], [a], [2.0])
    >>> torch.allclose(svd.S, torch.linalg.svdvals(2 * b @ a)[:2])
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from lorakit.adapter import LoraModule

GRAM_RTOL = 1e-13


class FactoredSVD(NamedTuple):
    """``M = U @ diag(S) @ Vh``; ``U (..., out, p)``, ``S (..., p)`` descending, ``Vh (..., p, in)``."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


CHOL_MIN_PIVOT = 1e-10  # relative squared pivot below which Cholesky hands over to eigh


def _whiten_fast(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`_whiten` but by Cholesky (``gram = L L^T``, ``root = L^T``, ``inv = L^-T``)
    where it is well conditioned, which is several times cheaper than ``eigh``; items that are
    rank-deficient or nearly so (a pivot below ``CHOL_MIN_PIVOT * max diag``) use ``eigh``."""
    low, info = torch.linalg.cholesky_ex(gram)  # (n, R, R)
    piv = torch.diagonal(low, dim1=-2, dim2=-1).pow(2)  # (n, R)
    scale = torch.diagonal(gram, dim1=-2, dim2=-1).amax(-1, keepdim=True)  # (n, 1)
    ok = (info == 0) & (piv > CHOL_MIN_PIVOT * scale).all(-1) & (scale[:, 0] > 0)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device).expand_as(gram)
    inv = torch.linalg.solve_triangular(low.mT, eye, upper=True)  # L^-T
    root = low.mT.clone()
    if not bool(ok.all()):
        bad = ~ok
        r_bad, i_bad = _whiten(gram[bad])
        root[bad], inv[bad] = r_bad, i_bad
    return root, inv


def _whiten(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``gram (n, R, R)``: ``(root (n, R, R), inv (n, R, R))`` with ``root = L^1/2 V^T`` and
    ``inv = V L^-1/2`` restricted to eigenvalues above the cut (others zeroed)."""
    lam, vec = torch.linalg.eigh(gram)  # (n, R), (n, R, R) ascending
    top = lam.amax(dim=-1, keepdim=True).clamp_min(0)  # (n, 1)
    keep = lam > GRAM_RTOL * top  # (n, R)
    keep &= top > 0
    lam = torch.where(keep, lam, torch.ones_like(lam))
    sq = lam.sqrt()
    root = (vec * torch.where(keep, sq, torch.zeros_like(sq)).unsqueeze(-2)).mT  # (n, R, R)
    inv = vec * torch.where(keep, 1.0 / sq, torch.zeros_like(sq)).unsqueeze(-2)  # (n, R, R)
    return root, inv


class Core(NamedTuple):
    """The small part of a batched factored SVD: enough to back-project any number of triplets."""

    left: torch.Tensor  # (n, R, R): U = B @ left[..., :k]
    S: torch.Tensor  # (n, R) singular values, descending, float64
    right: torch.Tensor  # (n, R, R): Vh = right[..., :k, :] @ A


def factored_core(b: torch.Tensor, a: torch.Tensor, coeffs: torch.Tensor | None = None,
                  col_scale: torch.Tensor | None = None) -> Core:
    """Gram products of ``b (n, out, R)`` and ``a (n, R, in)`` and the small decompositions.

    ``col_scale (n, R)`` multiplies B's columns (per-term coefficients) without touching B.

    With ``B = Q_b rb`` (whitening of ``B^T B``), ``c B A = c Q_b C`` where ``C = rb A`` has Gram
    ``C C^T = rb (A A^T) rb^T = W diag(sigma^2) W^T``; so ``U = Q_b W = B ib W``,
    ``S = |c| sigma`` and ``Vh = sign(c) sigma^-1 W^T rb A``. Null directions get zero rows.
    """
    gb = (b.mT @ b).double()  # (n, R, R)
    if col_scale is not None:  # B is really B diag(d): scale the Gram, not the tall factor
        d = col_scale.to(device=gb.device, dtype=gb.dtype)  # (n, R)
        gb = gb * d.unsqueeze(-1) * d.unsqueeze(-2)
    ga = (a @ a.mT).double()  # (n, R, R)
    rb, ib = _whiten_fast(gb)  # B diag(d) = (B diag(d) ib) rb
    k_gram = rb @ ga @ rb.mT  # (n, R, R) = C C^T
    lam, w = torch.linalg.eigh(k_gram)  # ascending
    lam, w = lam.flip(-1), w.flip(-1)  # descending
    sigma = lam.clamp_min(0).sqrt()  # (n, R)
    top = sigma[..., :1]
    alive = (sigma > 1e-7 * top) & (top > 0)  # beyond float64 Gram precision: treat as null
    inv = torch.where(alive, 1.0 / torch.where(alive, sigma, torch.ones_like(sigma)),
                      torch.zeros_like(sigma))
    c = (torch.ones(sigma.shape[0], dtype=sigma.dtype, device=sigma.device) if coeffs is None
         else coeffs.to(device=sigma.device, dtype=sigma.dtype))
    s = torch.where(alive, sigma, torch.zeros_like(sigma)) * c.abs().reshape(-1, 1)
    left = ib @ w  # (n, R, R)
    if col_scale is not None:
        left = d.unsqueeze(-1) * left  # U = B diag(d) ib W
    right = (inv * torch.sign(c).reshape(-1, 1)).unsqueeze(-1) * (w.mT @ rb)  # (n, R, R)
    return Core(left, s, right)


def back_project(core: Core, b: torch.Tensor, a: torch.Tensor, rank: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``rank`` ``U (n, out, k)`` and ``Vh (n, k, in)`` in ``b``'s dtype."""
    k = max(0, min(rank, core.S.shape[-1]))
    left = core.left[..., :k].to(b.dtype)  # (n, R, k)
    right = core.right[..., :k, :].to(a.dtype)  # (n, k, R)
    return b @ left, right @ a  # (n, out, k), (n, k, in)


def batched_factored_svd(B: torch.Tensor, A: torch.Tensor, *, rank: int | None = None,
                         coeffs: torch.Tensor | None = None,
                         work_dtype: torch.dtype = torch.float32,
                         device: torch.device | str | None = None) -> FactoredSVD:
    """Exact SVD of ``c * B @ A`` for a batch: ``B (n, out, R)``, ``A (n, R, in)``, optional
    per-item ``coeffs (n,)`` applied to the small core (no pass over the big factors). Returns the
    top ``rank`` triplets (default ``R``) in float64 for S and ``work_dtype`` for U and Vh.

    Example:
        >>> import torch
        >>> svd = batched_factored_svd(torch.randn(3, 8, 2), torch.randn(3, 2, 7))
        >>> tuple(svd.U.shape), tuple(svd.S.shape), tuple(svd.Vh.shape)
        ((3, 8, 2), (3, 2), (3, 2, 7))
    """
    dev = torch.device(device) if device is not None else B.device
    b = B.to(device=dev, dtype=work_dtype)  # (n, out, R)
    a = A.to(device=dev, dtype=work_dtype)  # (n, R, in)
    core = factored_core(b, a, coeffs)
    k = core.S.shape[-1] if rank is None else max(0, min(rank, core.S.shape[-1]))
    u, vh = back_project(core, b, a, k)
    return FactoredSVD(u, core.S[..., :k], vh)


def factored_svd(ups: Sequence[torch.Tensor], downs: Sequence[torch.Tensor],
                 coeffs: Sequence[float] | None = None, *, rank: int | None = None,
                 dtype: torch.dtype = torch.float64,
                 device: torch.device | str | None = None) -> FactoredSVD:
    """Exact SVD of ``sum_i coeffs[i] * ups[i] @ downs[i]`` (``ups[i] (out, r_i)``,
    ``downs[i] (r_i, in)``), never forming the ``out x in`` matrix.

    Example:
        >>> import torch
        >>> b1, a1 = torch.randn(5, 2, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
        >>> b2, a2 = torch.randn(5, 1, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64)
        >>> s = factored_svd([b1, b2], [a1, a2], [1.0, -0.5]).S
        >>> torch.allclose(s, torch.linalg.svdvals(b1 @ a1 - 0.5 * b2 @ a2)[:3])
        True
    """
    coeffs = [1.0] * len(ups) if coeffs is None else list(coeffs)
    dev = torch.device(device) if device is not None else ups[0].device
    b = torch.cat([u.to(device=dev, dtype=dtype) * c for u, c in zip(ups, coeffs, strict=True)],
                  dim=1)  # (out, R)
    a = torch.cat([d.to(device=dev, dtype=dtype) for d in downs], dim=0)  # (R, in)
    svd = batched_factored_svd(b[None], a[None], rank=rank, work_dtype=dtype, device=dev)
    return FactoredSVD(svd.U[0], svd.S[0], svd.Vh[0])


def module_svd(module: LoraModule, dtype: torch.dtype = torch.float64) -> FactoredSVD:
    """Exact SVD of one module's update ``scale * B @ A`` (conv kernels flattened)."""
    return factored_svd([module.up_matrix()], [module.down_matrix()], [module.scale],
                        dtype=dtype)


def singular_values(module: LoraModule) -> torch.Tensor:
    """The ``r`` singular values of ``scale * B @ A`` (float64, descending, zeros padded).

    Example:
        >>> import torch
        >>> m = LoraModule(torch.eye(2, 3), 3 * torch.eye(4, 2), alpha=2)
        >>> singular_values(m).tolist()
        [3.0, 3.0]
    """
    return module_svd(module).S
