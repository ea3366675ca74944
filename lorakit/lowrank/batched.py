"""Truncated SVDs of many low-rank sums at once: the engine behind resize, merge and inspect.

Each item is a module's sum ``sum_i c_i B_i A_i`` given as terms ``(B_i (out, r_i),
A_i (r_i, in), c_i)``. Items with the same ``(out, in, (r_1, ..., r_k))`` are decomposed together
in chunks of ``CHUNK_ELEMENTS`` factor entries through work buffers reused across chunks: the
factors are copied (and converted) once, the coefficients scale the small Gram matrices, and only
the kept ``k`` columns of ``U`` and rows of ``V^T`` leave a chunk, already as output factors
``up = U_k (S_k / c)^1/2`` and ``down = (S_k / c)^1/2 V_k^T`` (balanced; ``c`` is the output
module's scale, 1 unless ``out_scale`` says otherwise) in the caller's dtype. On a multi-core CPU
the chunks run side by side, one single-threaded worker per intra-op thread
(:mod:`lorakit.lowrank.threads`): the copies, the small decompositions and the casts then use every
core too, not only the Gram products (1.5x faster on 2 cores for bench/merge_llm.py). Peak memory is
the inputs plus one chunk per worker plus the outputs.

Small items (``(out + in) R <= FLOAT64_BELOW``) and float64 inputs run in float64 throughout
(exact spectra for reports and tests at negligible cost); large ones use float32 tall products,
whose truncation error is within 1e-6 of the Eckart-Young optimum (the small decompositions are
float64 always) until the dropped tail falls below about 1e-4 of the kept norm: there float32
output factors cannot hold the result more closely (the dense float32 SVD that PEFT and kohya run
is tens of times further off there; pinned in tests/lowrank/test_factored.py).

Example:
    >>> import torch
    >>> t = {"q": [(torch.randn(6, 2), torch.randn(2, 5), 1.0)]}
    >>> out = truncated_sums(t, lambda key, s: 1)
    >>> tuple(out["q"].up.shape), tuple(out["q"].down.shape)
    ((6, 1), (1, 5))
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from lorakit.lowrank.factored import Core, back_project, factored_core
from lorakit.lowrank.threads import parallel_map

CHUNK_ELEMENTS = 1 << 22  # factor entries per chunk (measured best on 2 cores: fits L3 twice)
FLOAT64_BELOW = 1 << 18

TermT = tuple[torch.Tensor, torch.Tensor, float]  # (B (out, r), A (r, in), coefficient)


class Truncated(NamedTuple):
    """One item's result: balanced factors of the kept rank and the full spectrum."""

    up: torch.Tensor | None  # (out, k) in the output dtype (None when only spectra were asked)
    down: torch.Tensor | None  # (k, in)
    S: torch.Tensor  # (R,) float64, descending


def _signature(terms: Sequence[TermT]) -> tuple:
    b0, a0, _ = terms[0]
    return (b0.shape[0], a0.shape[1], tuple(int(b.shape[1]) for b, _, _ in terms))


def _fill(items: list[Sequence[TermT]], b: torch.Tensor, a: torch.Tensor,
          staging: Callable[[torch.dtype, torch.device], torch.Tensor]) -> torch.Tensor:
    """Copy every item's stacked factors into ``b (n, out, R)`` and ``a (n, R, in)``; return the
    per-column coefficients ``(n, R)`` (applied to the small Gram, not to the copies).

    ``staging(dtype, device)``: a reused ``(out, R)`` buffer of the inputs' dtype and device.
    B's columns are concatenated there, then converted in one contiguous copy: 1.3-1.6x faster
    than a fresh ``torch.cat`` (page faults) and than converting narrow strided column blocks one
    by one."""
    scale = torch.ones(b.shape[0], b.shape[2], dtype=torch.float64)
    for j, terms in enumerate(items):
        ups = [up for up, _, _ in terms]
        if len(ups) == 1:
            b[j].copy_(ups[0])  # (out, R)
        elif all(u.dtype == ups[0].dtype and u.device == ups[0].device for u in ups):
            b[j].copy_(torch.cat(ups, dim=1, out=staging(ups[0].dtype, ups[0].device)))
        else:  # mixed dtypes or devices: a fresh (promoted) concatenation
            b[j].copy_(torch.cat([u.to(b.device) for u in ups], dim=1))
        col = 0
        for up, down, c in terms:
            r = up.shape[1]
            a[j, col:col + r].copy_(down)  # (r, in), converts dtype in the copy
            scale[j, col:col + r] = c
            col += r
    return scale


def _chunk_core(keys: list[str], b: torch.Tensor, a: torch.Tensor, scale: torch.Tensor,
                cores: dict[str, Core] | None) -> Core:
    """The chunk's core, reused from ``cores`` when every key has one."""
    if cores is not None and all(k in cores for k in keys):
        return Core(*(torch.stack([cores[k][f] for k in keys]).to(b.device)
                      for f in range(len(Core._fields))))
    return factored_core(b, a, col_scale=scale)


def _emit(keys: list[str], core: Core, b: torch.Tensor, a: torch.Tensor, ks: list[int],
          out_dtype: Callable[[str], torch.dtype] | None,
          out_scale: Callable[[str], float] | None, work: torch.Tensor) -> dict[str, Truncated]:
    """Back-project the chunk's kept triplets as balanced factors, one output per key.

    The projections land in ``work`` (a reused flat buffer of ``b``'s dtype, at least
    ``n (out + in) kmax`` entries); each output is a fresh copy in its own dtype."""
    c = torch.tensor([out_scale(k) if out_scale else 1.0 for k in keys], dtype=torch.float64)
    weights = (core.S[:, :max(ks)] / c.to(core.S.device).unsqueeze(-1)).clamp_min(0).sqrt()
    n, o, kmax, i = b.shape[0], b.shape[1], max(ks), a.shape[2]
    bufs = (work[:n * o * kmax].view(n, o, kmax),  # (n, out, kmax)
            work[n * o * kmax:n * (o + i) * kmax].view(n, kmax, i))  # (n, kmax, in)
    up, down = back_project(core, b, a, kmax, weights, out=bufs)
    s_cpu = core.S.cpu()  # (n, R)
    out = {}
    for j, key in enumerate(keys):
        dt = out_dtype(key) if out_dtype else torch.float32
        out[key] = Truncated(up[j, :, :ks[j]].to("cpu", dt, copy=True).contiguous(),  # (out, k)
                             down[j, :ks[j]].to("cpu", dt, copy=True).contiguous(),  # (k, in)
                             s_cpu[j])
    return out


def truncated_sums(items: dict[str, Sequence[TermT]],
                   rank_of: Callable[[str, torch.Tensor], int] | None, *,
                   device: torch.device | str = "cpu",
                   out_dtype: Callable[[str], torch.dtype] | None = None,
                   progress: Callable[[str], None] | None = None,
                   out_scale: Callable[[str], float] | None = None,
                   cores: dict[str, Core] | None = None) -> dict[str, Truncated]:
    """Spectra of every item and, unless ``rank_of`` is None, its top-``rank_of(key, S)`` factors.

    ``out_scale(key)``: the scale the output module applies, so that
    ``out_scale * up @ down`` is the truncated sum (default 1). ``cores``: with ``rank_of`` None,
    a dict that receives every item's small core (``3 R^2`` float64 numbers); passed back with a
    ``rank_of``, those items skip the Gram products (a global budget needs all spectra first).

    Example:
        >>> import torch
        >>> t = {"q": [(torch.eye(3, 1), torch.eye(1, 4), 2.0), (torch.eye(3, 1), torch.eye(1, 4), 1.0)]}
        >>> truncated_sums(t, lambda k, s: 1)["q"].S.tolist()
        [3.0, 0.0]
    """
    device = torch.device(device)
    groups: dict[tuple, list[str]] = {}
    for key, terms in items.items():
        groups.setdefault(_signature(terms), []).append(key)
    jobs: list[tuple[tuple, list[str]]] = []  # (group signature, chunk keys), group by group
    span = stage_span = 0  # entries of the largest chunk's b + a, and of the largest B
    for sig, keys in groups.items():
        o, i, rs = sig
        per = max(1, CHUNK_ELEMENTS // max(1, (o + i) * sum(rs)))
        jobs += [(sig, keys[start:start + per]) for start in range(0, len(keys), per)]
        span = max(span, min(per, len(keys)) * (o + i) * sum(rs))
        stage_span = max(stage_span, o * sum(rs))
    local = threading.local()  # each worker's work buffers, reused across its chunks

    def flat(name: str, size: int, dtype: torch.dtype, where: torch.device) -> torch.Tensor:
        """This worker's buffer ``name``, allocated once for the whole call at its largest size
        (on CPU pages never touched cost nothing; reallocating at each group change would fault
        fresh pages in again: 30% of a merge's page faults)."""
        bufs = local.__dict__.setdefault("bufs", {})
        got = bufs.get((name, dtype, where))
        if got is None:
            got = bufs[(name, dtype, where)] = torch.empty(size, dtype=dtype, device=where)
        return got

    def run(job: tuple[tuple, list[str]]) -> dict[str, Truncated]:
        (o, i, rs), chunk = job
        r, n = sum(rs), len(chunk)
        wide = any(t.dtype == torch.float64 for k in chunk for b, a, _ in items[k] for t in (b, a))
        wd = torch.float64 if (o + i) * r <= FLOAT64_BELOW or wide else torch.float32
        work = flat("work", 2 * span, wd, device)  # b, a, then the back-projections
        b = work[:n * o * r].view(n, o, r)  # (n, out, R)
        a = work[n * o * r:n * (o + i) * r].view(n, r, i)  # (n, R, in)

        def staging(dtype: torch.dtype, where: torch.device) -> torch.Tensor:  # (out, R)
            return flat("stage", stage_span, dtype, where)[:o * r].view(o, r)

        scale = _fill([items[k] for k in chunk], b, a, staging)  # (n, R) term coefficients
        core = _chunk_core(chunk, b, a, scale, cores)
        s_cpu = core.S.cpu()  # (n, R)
        if rank_of is None:
            if cores is not None:
                cores.update({k: Core(*(f[j].cpu() for f in core)) for j, k in enumerate(chunk)})
            return {k: Truncated(None, None, s_cpu[j]) for j, k in enumerate(chunk)}
        ks = [max(1, min(int(rank_of(k, s_cpu[j])), r)) for j, k in enumerate(chunk)]
        return _emit(chunk, core, b, a, ks, out_dtype, out_scale, work[n * (o + i) * r:])

    out: dict[str, Truncated] = {}
    for res in parallel_map(run, jobs, device=device):
        out.update(res)
        if progress and rank_of is not None:
            for key in res:
                progress(key)
    return out
