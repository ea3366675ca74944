"""``iso_c``: Iso-C, isotropic merging in the common subspace.

Per module: the task sum ``D = sum_t D_t`` (``D_t = w_t s_t B_t A_t``) ``= U S V^T``; its spectrum
is flattened, every singular value replaced by their mean ``s_bar``, and scaled by ``alpha``:
``alpha * s_bar * U V^T``. The mean is over the sum's numerical rank (at most ``R = sum r_t``):
the paper's full-matrix mean would count the zero singular values of a low-rank sum and give its
arbitrary null directions the weight ``s_bar`` (:mod:`lorakit.merge.subspace`). Computed exactly
in Core Space.

Reference: Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces", ICML 2025 (Iso-C).

Evidence (``bench/quality.py``, six zoo adapters, SmolLM2-135M, all weights 1; mean normalised
score, 0 = base model, 1 = each task's own adapter; ``bench/results/quality.md``):
alpha 1: 0.34, 1.5: 0.49 (the paper tunes ``alpha`` per setting), so ``alpha=1.5`` is the
default; the best value may lie above the range swept.

Example:
    >>> lorakit.merge([a, b, c], "iso_c", alpha=1.0)   # doctest: +SKIP
"""

from __future__ import annotations

import torch

from lorakit.adapter import LoraModule
from lorakit.merge.align import Space, Term
from lorakit.merge.options import IsoCOptions, MergeContext
from lorakit.merge.spaces import stack_merge
from lorakit.merge.subspace import top_svd


def iso_c_core(cores: torch.Tensor, alpha: float) -> torch.Tensor:
    """Iso-C of the stack ``cores (n, p, q)`` -> ``(p, q)``."""
    u, s, vh = top_svd(cores.sum(dim=0))
    if s.numel() == 0:
        return torch.zeros(cores.shape[1:], dtype=torch.float64)
    return alpha * s.mean() * (u @ vh)


def merge_iso_c(aligned: dict[str, list[Term]], options: IsoCOptions, ctx: MergeContext
                ) -> dict[str, LoraModule]:
    """Iso-C over every module (see the module docstring)."""
    return stack_merge(aligned, ctx, lambda stack, cuts, gen: iso_c_core(stack, options.alpha),
                       1.0, Space.CORE)
