"""Run a merge rule in a space (``--space full|knots|core``) and return to low rank.

* ``full``: the dense route (:func:`lorakit.merge.dense.dense_merge`): each module's task updates
  rebuilt block of rows by block of rows, the rule applied, then the engine's seeded randomized
  SVD and the rank policy (default: the largest input rank, as PEFT's ``ties_svd``).
* ``knots``: the tasks' coefficients ``V_t (p, in)`` in the joint SVD basis of the side-by-side
  updates (:func:`lorakit.merge.knots.aligned_blocks`); the merged update ``U S V_merged``.
* ``core``: the tasks' cores ``M_t (R_B, R_A)`` in the SVD bases of the stacked factors
  (:func:`lorakit.merge.align.core_space`); the merged update ``U_B M_merged V_A^T``.

In ``knots`` and ``core`` the merged update is exactly low rank (at most ``R = sum r_t``) and its
SVD comes from the small merged tensor: without a rank policy the numerical rank is kept; a
policy truncates it exactly. Magnitude cuts are per task over each module (``scope=tensor``) or
over all of a task's modules (``scope=global``), in the space's own coordinates.

Example:
    >>> lorakit.merge([a, b], "ties", space="core", density=0.2)   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lorakit.adapter import LoraModule
from lorakit.lowrank.threads import parallel_map
from lorakit.merge.align import Space, Term, core_space
from lorakit.merge.options import MergeContext, TrimScope
from lorakit.merge.rules import Cuts, RuleCore

# a rule over a whole stack: tau (n, p, q) -> merged (p, q) (before lam), given its cuts
StackRule = Callable[[torch.Tensor, Cuts | None, torch.Generator], torch.Tensor]


def n_tasks(aligned: dict[str, list[Term]]) -> int:
    return 1 + max(t.index for terms in aligned.values() for t in terms)


def full_cuts(core: RuleCore, aligned: dict[str, list[Term]], scope: TrimScope,
              ctx: MergeContext):
    """``thresholds(key, terms)`` for the dense route: one dense update per task at a time
    (``tensor``), or sampled over all modules (``global``, :func:`dense.global_samples`)."""
    from lorakit.lowrank.device import resolve_device
    from lorakit.merge.dense import global_samples, task_magnitudes

    if not core.needs_cuts:
        return None
    device = resolve_device(ctx.device)
    n = n_tasks(aligned)
    if scope is TrimScope.GLOBAL:
        shared = core.cuts_from(global_samples(aligned, n, device, ctx.seed))

        def thresholds(key, terms):
            return shared
        return thresholds

    def per_tensor(key, terms):
        return core.cuts_from(task_magnitudes(terms, n, device))
    return per_tensor


def rule_merge(aligned: dict[str, list[Term]], ctx: MergeContext, core: RuleCore, lam: float,
               space: Space, scope: TrimScope = TrimScope.TENSOR) -> dict[str, LoraModule]:
    """An entry-wise rule (:class:`RuleCore`) in ``space`` over every module."""
    if space is Space.FULL:
        from lorakit.merge.dense import dense_merge

        return dense_merge(aligned, ctx, core.combine, lam, full_cuts(core, aligned, scope, ctx))
    return stack_merge(aligned, ctx, core.combine, lam, space,
                       core if core.needs_cuts else None, scope)


def _project(aligned: dict[str, list[Term]], ctx: MergeContext, space: Space):
    from lorakit.lowrank.device import resolve_device
    from lorakit.merge.knots import aligned_blocks

    dev = resolve_device(ctx.device)
    n = n_tasks(aligned)

    def project(key: str):
        terms = aligned[key]
        if space is Space.CORE:
            cs = core_space(terms, n, dev)
            return cs, cs.cores
        u, s, v = aligned_blocks(terms, n, dev)
        return _KnotsBasis(u, s), v

    out = {}
    # modules side by side, one thread each (lowrank.threads): small decompositions and
    # conversions of the factors gain nothing from a second thread inside one module
    for key, res in zip(aligned, parallel_map(project, list(aligned), device=dev), strict=True):
        ctx.tick(key)
        out[key] = res
    return out


def stack_merge(aligned: dict[str, list[Term]], ctx: MergeContext, rule, lam: float,
                space: Space, cutter: RuleCore | None = None,
                scope: TrimScope = TrimScope.TENSOR, keyed: bool = False
                ) -> dict[str, LoraModule]:
    """Apply ``rule`` (a :data:`StackRule`, or with ``keyed`` a function of the module key
    returning one) to every module's task stack in ``space`` (``knots`` or ``core``); the cuts
    come from ``cutter`` per tensor or over all modules (``scope=global``)."""
    from lorakit.merge.build import module_from_svd
    from lorakit.merge.exact import choose_ranks

    if space is Space.FULL:
        raise ValueError("stack_merge runs in knots or core space")
    blocks = _project(aligned, ctx, space)
    shared = None
    if cutter is not None and scope is TrimScope.GLOBAL:
        n = n_tasks(aligned)
        shared = cutter.cuts_from([torch.cat([v[i].abs().reshape(-1).cpu()
                                              for _, v in blocks.values()]) for i in range(n)])
    gen = torch.Generator().manual_seed(ctx.seed)
    merged = {}
    for key, (_basis, stack) in blocks.items():  # in order: a rule may draw from ``gen``
        cuts = shared if shared is not None else (cutter.cuts(stack) if cutter else None)
        fn = rule(key) if keyed else rule
        merged[key] = fn(stack.clone(), cuts, gen) * lam  # (p, q)
    dev = next(iter(merged.values())).device if merged else torch.device("cpu")
    # small (core) or already tall (knots) SVDs, modules side by side
    smalls = dict(zip(merged, parallel_map(lambda k: blocks[k][0].svd(merged[k]), list(merged),
                                           device=dev), strict=True))
    likes = {k: t[0].module for k, t in aligned.items()}
    ranks = choose_ranks({k: v[1].cpu() for k, v in smalls.items()}, likes, ctx.policy)

    def back(key: str) -> LoraModule:  # only the kept rank is ever projected back
        u, s, vh = blocks[key][0].back_project(smalls[key], ranks[key])
        return module_from_svd(u.cpu(), s.cpu(), vh.cpu(), likes[key],
                               ctx.out_dtype(aligned[key]))

    return dict(zip(smalls, parallel_map(back, list(smalls), device=dev), strict=True))


class _KnotsBasis:
    """The KnOTS side of :func:`stack_merge`: ``update = (U S) @ merged``, its SVD through the
    engine (:func:`lorakit.lowrank.factored_svd`)."""

    def __init__(self, u: torch.Tensor, s: torch.Tensor) -> None:
        self.left = u * s  # (out, p)

    def svd(self, merged: torch.Tensor):
        from lorakit.lowrank import factored_svd

        sv = factored_svd([self.left], [merged], device=merged.device)
        return sv.U, sv.S, sv.Vh

    def back_project(self, small, rank: int):
        u, s, vh = small
        return u[:, :rank], s[:rank], vh[:rank]
