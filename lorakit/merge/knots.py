"""``knots``: KnOTS-style merging in a jointly aligned SVD basis.

Per module the tasks' updates are placed side by side,
``[D_1 ... D_T] = U S [V_1^T ... V_T^T]`` with ``D_t = w_t s_t B_t A_t``; this SVD comes from the
factors (``[B_1..B_T]`` times the block-diagonal ``diag(A_1..A_T)``), so ``U`` has at most
``R = sum r_t`` columns and each task is its coefficient block ``V_t^T`` ``(p, in)``. The tasks'
``V_t`` are merged element-wise (TIES: top-``density`` per task over all layers, sign election,
disjoint mean; DARE-TIES; or plain sum/mean) and the merged update
``lam * U S V_merged^T`` is already low rank (``p <= R``); an optional rank policy truncates it
exactly. With ``merge=sum``, ``density=1`` and ``lam=1`` the result equals ``linear``.

Reference: Stoica et al., "Model merging with SVD to tie the KnOTS", ICLR 2025.

Evidence for ``lam`` from ``bench/quality.py`` on the six zoo adapters (SmolLM2-135M, all weights
1, TIES on the aligned coefficients; mean normalised score, 0 = base model, 1 = each task's own
adapter): density 0.2 with lam 1.5: -1.98, 1.0: -0.60, 0.5: 0.30, 0.3: 0.39; density 0.5, lam 1:
-0.37; density 0.1, lam 0.5: 0.27. Summing six full-strength updates breaks the language-modelling
tasks, hence the default ``lam=0.3``; pass ``lam=1`` (with ``merge=sum``, ``density=1``) for the
exact ``linear`` sum (``bench/results/quality*.md``).

Example:
    >>> lorakit.merge([a, b, c], "knots", density=0.2)   # doctest: +SKIP
"""

from __future__ import annotations

import torch

from lorakit.adapter import LoraModule
from lorakit.merge.align import Term
from lorakit.merge.options import KnotsMerge, KnotsOptions, MergeContext
from lorakit.merge.sparsify import dare_drop, disjoint_merge, elect_sign


def aligned_blocks(terms: list[Term], n_tasks: int, device: torch.device):
    """``U (out, p)``, ``S (p,)`` and ``V (n_tasks, p, in*k)`` of the side-by-side updates."""
    from lorakit.lowrank import factored_svd

    inp = terms[0].module.down_matrix().shape[1]
    rs = [t.module.rank for t in terms]
    ups = [t.module.up_matrix(torch.float64) * t.coeff for t in terms]  # (out, r_t)
    blk = torch.zeros(sum(rs), len(terms) * inp, dtype=torch.float64)  # (R, T*in) block-diag
    row = 0
    for j, t in enumerate(terms):
        blk[row:row + rs[j], j * inp:(j + 1) * inp] = t.module.down_matrix(torch.float64)
        row += rs[j]
    svd = factored_svd([torch.cat(ups, dim=1)], [blk], device=device)
    p = max(1, int((svd.S > 1e-12 * float(svd.S[0])).sum())) if float(svd.S[0]) > 0 else 1
    vh = svd.Vh[:p].reshape(p, len(terms), inp).permute(1, 0, 2)  # (T_present, p, in)
    v = torch.zeros(n_tasks, p, inp, dtype=vh.dtype, device=vh.device)
    for j, t in enumerate(terms):
        v[t.index] += vh[j]
    return svd.U[:, :p], svd.S[:p], v


def _global_thresholds(blocks: dict, density: float) -> torch.Tensor:
    """Per task, the magnitude above which ``density`` of its coefficients (all layers) lie."""
    n = next(iter(blocks.values()))[2].shape[0]
    out = []
    for i in range(n):
        vals = torch.cat([b[2][i].abs().reshape(-1).cpu() for b in blocks.values()])
        k = int(round(density * vals.numel()))
        out.append(float("inf") if k <= 0 else float(torch.topk(vals, k).values.min()))
    return torch.tensor(out, dtype=torch.float64)


def merge_knots(aligned: dict[str, list[Term]], options: KnotsOptions, ctx: MergeContext
                ) -> dict[str, LoraModule]:
    """KnOTS over every module (see the module docstring)."""
    from lorakit.lowrank.device import resolve_device
    from lorakit.merge.build import module_from_svd
    from lorakit.merge.exact import choose_ranks

    dev = resolve_device(ctx.device)
    n = 1 + max(t.index for terms in aligned.values() for t in terms)
    blocks = {}
    for key, terms in aligned.items():
        ctx.tick(key)
        blocks[key] = aligned_blocks(terms, n, dev)
    th = _global_thresholds(blocks, options.density) if options.merge is KnotsMerge.TIES else None
    gen = torch.Generator().manual_seed(ctx.seed)
    merged = {}
    for key, (u, s, v) in blocks.items():
        if options.merge is KnotsMerge.SUM:
            vm = v.sum(0)
        elif options.merge is KnotsMerge.MEAN:
            vm = v.mean(0)
        elif options.merge is KnotsMerge.TIES:
            keep = v.abs() >= th.to(v.device).reshape(-1, 1, 1)
            trimmed = v * keep.to(v.dtype)
            vm = disjoint_merge(trimmed, elect_sign(trimmed, options.sign), options.disjoint)
        else:
            dropped = dare_drop(v, options.density, gen)
            vm = disjoint_merge(dropped, elect_sign(dropped, options.sign), options.disjoint)
        up = u * (s * options.lam)  # (out, p)
        merged[key] = (up, vm)  # update = up @ vm
    from lorakit.lowrank import factored_svd

    svds = {k: factored_svd([up], [vm], device=dev) for k, (up, vm) in merged.items()}
    likes = {k: t[0].module for k, t in aligned.items()}
    ranks = choose_ranks({k: v.S for k, v in svds.items()}, likes, ctx.policy)
    return {k: module_from_svd(sv.U[:, :ranks[k]].cpu(), sv.S[:ranks[k]].cpu(),
                               sv.Vh[:ranks[k]].cpu(), likes[k], ctx.out_dtype(aligned[k]))
            for k, sv in svds.items()}
