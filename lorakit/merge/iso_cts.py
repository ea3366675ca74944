"""``iso_cts``: Iso-CTS, isotropic merging in common and task-specific subspaces.

Per module, with ``d = min(R_B, R_A)`` the Core Space dimension (the ranks of the stacked
``[B_1 .. B_T]`` and ``[A_1; ..; A_T]``: the span every task lives in; the paper's
``min(out, in)`` for full-rank updates):

1. common subspace: the top ``k = max(1, floor(common_fraction * d))`` singular triplets
   ``U_k, S_k, V_k`` of the task sum ``sum_t D_t``;
2. task-specific subspaces: each task's update with the common left subspace projected out,
   ``(I - U_k U_k^T) D_t``, keeps its top ``s = floor((d - k) / T)`` triplets;
3. the stacked ``[U_k, U_1 .. U_T]`` and ``[V_k, V_1 .. V_T]`` are replaced by their nearest
   orthonormal matrices (Procrustes), and the spectrum is flattened to the mean ``s_bar`` of all
   kept singular values: ``alpha * s_bar * U_perp V_perp^T``.

Every kept direction lies inside its matrix's numerical rank (:mod:`lorakit.merge.subspace`).
Computed exactly in Core Space.

Reference: Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces", ICML 2025 (Iso-CTS).

Evidence (``bench/quality.py``, six zoo adapters, SmolLM2-135M, all weights 1; mean normalised
score, 0 = base model, 1 = each task's own adapter; ``bench/results/quality.md``):
alpha 1: 0.33, 1.5: 0.47 (``common_fraction=0.8``, the paper's), so ``alpha=1.5`` is the default.

Example:
    >>> lorakit.merge([a, b, c], "iso_cts", common_fraction=0.8)   # doctest: +SKIP
"""

from __future__ import annotations

import math

import torch

from lorakit.adapter import LoraModule
from lorakit.merge.align import Space, Term
from lorakit.merge.options import IsoCtsOptions, MergeContext
from lorakit.merge.spaces import stack_merge
from lorakit.merge.subspace import procrustes, top_svd


def iso_cts_core(cores: torch.Tensor, common_fraction: float, alpha: float) -> torch.Tensor:
    """Iso-CTS of the stack ``cores (n, p, q)`` (``d = min(p, q)``) -> ``(p, q)``."""
    n, p, q = cores.shape
    d = min(p, q)
    k = max(1, math.floor(common_fraction * d))
    s_task = (d - k) // n
    u, s, vh = top_svd(cores.sum(dim=0), k)  # (p, k'), (k',), (k', q)
    us, ss, vs = [u], [s], [vh.T]
    if s_task > 0:
        for m in cores:
            rest = m.double() - u @ (u.T @ m.double())  # (p, q)
            ut, st, vht = top_svd(rest, s_task)
            us.append(ut)
            ss.append(st)
            vs.append(vht.T)
    sig = torch.cat(ss)
    if sig.numel() == 0:
        return torch.zeros(p, q, dtype=torch.float64)
    return alpha * sig.mean() * (procrustes(torch.cat(us, 1)) @ procrustes(torch.cat(vs, 1)).T)


def merge_iso_cts(aligned: dict[str, list[Term]], options: IsoCtsOptions, ctx: MergeContext
                  ) -> dict[str, LoraModule]:
    """Iso-CTS over every module (see the module docstring)."""
    return stack_merge(aligned, ctx, lambda stack, cuts, gen: iso_cts_core(
        stack, options.common_fraction, options.alpha), 1.0, Space.CORE)
