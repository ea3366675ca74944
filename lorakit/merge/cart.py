"""``cart``: CART, centred task arithmetic with low-rank residuals.

Per module, with ``D_t = w_t s_t B_t A_t`` and the mean ``D_bar = (1/T) sum_t D_t``:
``D_bar + lam * sum_t LR_k(D_t - D_bar)``, where ``LR_k`` is the best rank-``k`` approximation
(truncated SVD, inside the residual's numerical rank) and ``k = ceil(rank_fraction * d)`` for the
Core Space dimension ``d = min(R_B, R_A)`` (the paper's fraction of the full dimension, for
full-rank updates). With ``rank_fraction = 1`` the residuals sum to zero and CART is the plain
average ``D_bar`` (``linear`` with weights ``1/T``); lower ranks add back each task's strongest
individual directions. Computed exactly in Core Space (:mod:`lorakit.merge.subspace`).

Reference: Choi et al., "Revisiting Weight Averaging for Model Merging" (CART), 2024
(arXiv:2412.12153).

Evidence (``bench/quality.py``, six zoo adapters, SmolLM2-135M, all weights 1; mean normalised
score, 0 = base model, 1 = each task's own adapter; ``bench/results/quality.md``):
rank_fraction 0.1 with lam 1: 0.48, lam 1.5: 0.51, rank_fraction 0.2 (lam 1): 0.44, so
``rank_fraction=0.1``, ``lam=1.5`` are the defaults (the best data-free merge of the run).

Example:
    >>> lorakit.merge([a, b, c], "cart", rank_fraction=0.1, lam=1.0)   # doctest: +SKIP
"""

from __future__ import annotations

import math

import torch

from lorakit.adapter import LoraModule
from lorakit.merge.align import Space, Term
from lorakit.merge.options import CartOptions, MergeContext
from lorakit.merge.spaces import stack_merge
from lorakit.merge.subspace import top_svd


def cart_core(cores: torch.Tensor, rank_fraction: float, lam: float) -> torch.Tensor:
    """CART of the stack ``cores (n, p, q)`` -> ``(p, q)``."""
    c = cores.double()
    mean = c.mean(dim=0)  # (p, q)
    k = max(1, math.ceil(rank_fraction * min(c.shape[1:])))
    out = mean.clone()
    for m in c:
        u, s, vh = top_svd(m - mean, k)
        out += lam * (u * s) @ vh
    return out


def merge_cart(aligned: dict[str, list[Term]], options: CartOptions, ctx: MergeContext
               ) -> dict[str, LoraModule]:
    """CART over every module (see the module docstring)."""
    return stack_merge(aligned, ctx, lambda stack, cuts, gen: cart_core(
        stack, options.rank_fraction, options.lam), 1.0, Space.CORE)
