"""The dense route for element-wise methods (TIES, DARE, magnitude pruning).

These methods act on the entries of each task's full update, so each module's updates are
materialised one module at a time (``tau (n_tasks, out, in*k)`` in float32), combined, and brought
back to low rank by the engine's seeded randomized SVD with the rank policy (default: the largest
input rank, as PEFT's ``ties_svd`` does). Peak memory is one module's dense updates.

With a ``global`` trim scope the magnitude threshold of each task is taken over all its modules:
exactly when the task has at most ``GLOBAL_SAMPLE`` entries in all, otherwise estimated from a
seeded uniform sample of that many entries.

Example:
    >>> lorakit.merge([a, b], "ties", density=0.2)   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lorakit.adapter import LoraModule
from lorakit.merge.align import Term
from lorakit.merge.build import module_from_svd
from lorakit.merge.options import MergeContext

GLOBAL_SAMPLE = 1 << 22
Combine = Callable[[torch.Tensor, str, torch.Generator], torch.Tensor]


def dense_updates(terms: Sequence[Term], n_tasks: int, device: torch.device) -> torch.Tensor:
    """``tau (n_tasks, out, in*k)``: each task's weighted update (zeros where it has none)."""
    like = terms[0].module
    out, inp = like.out_features, like.down_matrix().shape[1]
    tau = torch.zeros(n_tasks, out, inp, dtype=torch.float32, device=device)
    for t in terms:
        b = t.module.up_matrix(torch.float32).to(device)  # (out, r)
        a = t.module.down_matrix(torch.float32).to(device)  # (r, in*k)
        tau[t.index] += t.coeff * (b @ a)
    return tau


def global_thresholds(aligned: dict[str, list[Term]], n_tasks: int, density: float,
                      device: torch.device, seed: int) -> list[float]:
    """Per-task magnitude threshold over all modules (exact or sampled, see module docs)."""
    g = torch.Generator().manual_seed(seed)
    total = sum(terms[0].module.out_features * terms[0].module.down_matrix().shape[1]
                for terms in aligned.values())
    frac = min(1.0, GLOBAL_SAMPLE / max(total, 1))
    samples: list[list[torch.Tensor]] = [[] for _ in range(n_tasks)]
    for terms in aligned.values():
        tau = dense_updates(terms, n_tasks, device).abs().reshape(n_tasks, -1).cpu()
        if frac < 1.0:
            keep = torch.rand(tau.shape[1], generator=g) < frac
            tau = tau[:, keep]
        for i in range(n_tasks):
            samples[i].append(tau[i])
    out = []
    for i in range(n_tasks):
        v = torch.cat(samples[i])
        k = int(round(density * v.numel()))
        out.append(float("inf") if k <= 0 else float(torch.topk(v, k, sorted=False).values.min()))
    return out


def dense_merge(aligned: dict[str, list[Term]], ctx: MergeContext, combine: Combine,
                lam: float = 1.0) -> dict[str, LoraModule]:
    """Run ``combine(tau, key, generator) -> merged (out, in*k)`` per module, then low rank."""
    from lorakit.lowrank.device import resolve_device
    from lorakit.lowrank.randomized import randomized_svd
    from lorakit.merge.exact import choose_ranks

    device = resolve_device(ctx.device)
    n = 1 + max(t.index for terms in aligned.values() for t in terms)
    gen = torch.Generator(device="cpu").manual_seed(ctx.seed)
    results = {}
    cap_of = {}
    for key, terms in aligned.items():
        ctx.tick(key)
        merged = lam * combine(dense_updates(terms, n, device), key, gen)  # (out, in*k)
        cap = max(t.module.rank for t in terms)
        if ctx.policy is not None and not ctx.policy.is_fixed:
            cap = min(min(merged.shape), sum(t.module.rank for t in terms))
        elif ctx.policy is not None:
            cap = min(min(merged.shape), max(1, ctx.policy.rank or cap))
        u, s, vh = randomized_svd(merged, cap, seed=ctx.seed)
        results[key] = (u, s, vh, float(merged.pow(2).sum()))
        cap_of[key] = cap
    likes = {k: t[0].module for k, t in aligned.items()}
    ranks = choose_ranks({k: v[1] for k, v in results.items()}, likes, ctx.policy) \
        if ctx.policy is not None else cap_of
    out = {}
    for key, (u, s, vh, _) in results.items():
        k = max(1, min(ranks[key], s.numel()))
        out[key] = module_from_svd(u[:, :k].cpu(), s[:k].cpu(), vh[:k].cpu(), likes[key],
                                   ctx.out_dtype(aligned[key]))
    return out
