"""The dense route (``space=full``) for element-wise rules (TIES, DARE, magnitude pruning,
Breadcrumbs, DELLA: :mod:`lorakit.merge.rules`).

These methods act on the entries of each task's full update ``tau_i = w_i s_i B_i A_i``. Per
module, lorakit (1) finds each task's magnitude cuts (one task's dense update at a time, or
over all of a task's modules with ``scope=global``), (2) rebuilds the tasks' updates
block of rows by block of rows from the factors, combines each block into the merged matrix
``M (out, in*k)``, and (3) returns ``M`` to low rank by the engine's seeded randomized SVD and the
rank policy (default: the largest input rank, as PEFT's ``ties_svd``). Peak memory is about two
dense ``out x in`` float32 matrices, whatever the number of tasks.

DARE's and DELLA's keep draws come from one seeded generator, block by block in row order (a
module small enough to fit one block draws exactly ``torch.rand((n_tasks, out, in))``); blocks
hold whole rows, so DELLA ranks each row in full.

With ``scope=global`` the threshold of each task is taken over all its modules: exactly when the
task has at most ``GLOBAL_SAMPLE`` entries in all, otherwise estimated from a seeded uniform
sample of that many entries.

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
BLOCK_ELEMENTS = 1 << 23  # entries of (n_tasks, rows, in) per block
# combine(tau_block (n, rows, in), cuts (rules.Cuts) or None, generator) -> (rows, in)
Combine = Callable[[torch.Tensor, object, torch.Generator], torch.Tensor]


def _factors(terms: Sequence[Term], device: torch.device):
    """Per present task: (index, B (out, r) * coeff, A (r, in*k)) in float32 on ``device``."""
    return [(t.index, t.module.up_matrix(torch.float32).to(device) * t.coeff,
             t.module.down_matrix(torch.float32).to(device)) for t in terms]


def dense_updates(terms: Sequence[Term], n_tasks: int, device: torch.device,
                  rows: slice | None = None) -> torch.Tensor:
    """``tau (n_tasks, rows, in*k)``: each task's weighted update (zeros where it has none)."""
    like = terms[0].module
    sl = rows or slice(0, like.out_features)
    height = len(range(like.out_features)[sl])
    tau = torch.zeros(n_tasks, height, like.down_matrix().shape[1], dtype=torch.float32,
                      device=device)
    for idx, b, a in _factors(terms, device):
        tau[idx] += b[sl] @ a
    return tau


def task_magnitudes(terms: Sequence[Term], n_tasks: int, device: torch.device):
    """Each task's flat ``|tau_i|`` for this module, one dense update at a time (a generator;
    an empty tensor for a task without the module, whose update is zero)."""
    by_task = {idx: (b, a) for idx, b, a in _factors(terms, device)}
    for i in range(n_tasks):
        if i in by_task:
            b, a = by_task[i]
            yield (b @ a).abs_().reshape(-1)
        else:
            yield torch.zeros(0, device=device)


def global_samples(aligned: dict[str, list[Term]], n_tasks: int, device: torch.device,
                   seed: int) -> list[torch.Tensor]:
    """Per task, its magnitudes over all modules: all of them when a task has at most
    ``GLOBAL_SAMPLE`` entries, else a seeded uniform sample of that many (see module docs)."""
    g = torch.Generator().manual_seed(seed)
    total = sum(terms[0].module.out_features * terms[0].module.down_matrix().shape[1]
                for terms in aligned.values())
    frac = min(1.0, GLOBAL_SAMPLE / max(total, 1))
    samples: list[list[torch.Tensor]] = [[] for _ in range(n_tasks)]
    for terms in aligned.values():
        numel = terms[0].module.out_features * terms[0].module.down_matrix().shape[1]
        keep = torch.rand(numel, generator=g) < frac if frac < 1.0 else None
        present = {idx for idx, _, _ in _factors(terms, device)}
        for idx, b, a in _factors(terms, device):
            mag = (b @ a).abs_().reshape(-1).cpu()
            samples[idx].append(mag if keep is None else mag[keep])
        for idx in set(range(n_tasks)) - present:  # a missing module is zeros for that task
            n = numel if keep is None else int(keep.sum())
            samples[idx].append(torch.zeros(n))
    return [torch.cat(s) for s in samples]


def dense_merge(aligned: dict[str, list[Term]], ctx: MergeContext, combine: Combine,
                lam: float = 1.0, thresholds: Callable[[str, list[Term]], object]
                | None = None) -> dict[str, LoraModule]:
    """Blockwise ``combine`` per module, then back to low rank (see the module docstring)."""
    from lorakit.lowrank.device import resolve_device
    from lorakit.lowrank.randomized import randomized_svd
    from lorakit.merge.exact import choose_ranks

    device = resolve_device(ctx.device)
    n = 1 + max(t.index for terms in aligned.values() for t in terms)
    gen = torch.Generator(device="cpu").manual_seed(ctx.seed)
    likes = {k: t[0].module for k, t in aligned.items()}
    out = {}
    for key, terms in aligned.items():
        ctx.tick(key)
        like = likes[key]
        o, i = like.out_features, like.down_matrix().shape[1]
        th = thresholds(key, terms) if thresholds else None
        merged = torch.empty(o, i, dtype=torch.float32, device=device)  # (out, in*k)
        rows = max(1, BLOCK_ELEMENTS // max(1, n * i))
        for r0 in range(0, o, rows):
            sl = slice(r0, min(o, r0 + rows))
            merged[sl] = combine(dense_updates(terms, n, device, sl), th, gen)
        if lam != 1.0:
            merged.mul_(lam)
        cap = max(t.module.rank for t in terms)
        if ctx.policy is not None and ctx.policy.is_fixed:
            cap = max(1, int(ctx.policy.rank))
        elif ctx.policy is not None:
            cap = sum(t.module.rank for t in terms)
        cap = min(cap, o, i)
        u, s, vh = randomized_svd(merged, cap, seed=ctx.seed)
        del merged
        if ctx.policy is not None and not ctx.policy.is_fixed:
            k = choose_ranks({key: s.cpu()}, {key: like}, ctx.policy)[key]
        else:
            k = cap
        k = max(1, min(k, s.numel()))
        out[key] = module_from_svd(u[:, :k].cpu(), s[:k].cpu(), vh[:k].cpu(), like,
                                   ctx.out_dtype(terms))
    return out
