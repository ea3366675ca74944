"""Truncated SVDs of many low-rank sums at once: the engine behind resize, merge and inspect.

Each item is a module's sum ``sum_i c_i B_i A_i`` given as terms ``(B_i (out, r_i),
A_i (r_i, in), c_i)``. Items with the same ``(out, in, (r_1, ..., r_k))`` are decomposed together
in chunks of ``CHUNK_ELEMENTS`` factor entries through work buffers reused across chunks: the
factors are copied (and converted) once, the coefficients scale the copied columns, and only the
kept ``k`` columns of ``U`` and rows of ``V^T`` leave a chunk, already balanced as output factors
``up = U_k S_k^1/2`` and ``down = S_k^1/2 V_k^T`` in the caller's dtype. Peak memory is the inputs
plus one chunk plus the outputs.

Small items (``(out + in) R <= FLOAT64_BELOW``) run in float64 throughout (exact spectra for
reports and tests at negligible cost); large ones use float32 tall products, whose truncation
error is within 1e-6 of the Eckart-Young optimum (the small decompositions are float64 always).

Example:
    >>> import torch
    >>> t = {"q": [(torch.randn(6, 2), torch.randn(2, 5), 1.0)]}
    >>> out = truncated_sums(t, lambda key, s: 1)
    >>> tuple(out["q"].up.shape), tuple(out["q"].down.shape)
    ((6, 1), (1, 5))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from lorakit.lowrank.factored import back_project, factored_core

CHUNK_ELEMENTS = 1 << 22
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


def _fill(items: list[Sequence[TermT]], b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Copy every item's stacked factors into ``b (n, out, R)`` and ``a (n, R, in)``; return the
    per-column coefficients ``(n, R)`` (applied to the small Gram, not to the copies)."""
    scale = torch.ones(b.shape[0], b.shape[2], dtype=torch.float64)
    for j, terms in enumerate(items):
        col = 0
        for up, down, c in terms:
            r = up.shape[1]
            b[j, :, col:col + r].copy_(up)  # converts dtype in the copy
            a[j, col:col + r].copy_(down)
            scale[j, col:col + r] = c
            col += r
    return scale


def truncated_sums(items: dict[str, Sequence[TermT]],
                   rank_of: Callable[[str, torch.Tensor], int] | None, *,
                   device: torch.device | str = "cpu",
                   out_dtype: Callable[[str], torch.dtype] | None = None,
                   progress: Callable[[str], None] | None = None) -> dict[str, Truncated]:
    """Spectra of every item and, unless ``rank_of`` is None, its top-``rank_of(key, S)`` factors.

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
    out: dict[str, Truncated] = {}
    for (o, i, rs), keys in groups.items():
        r = sum(rs)
        per = max(1, CHUNK_ELEMENTS // max(1, (o + i) * r))
        wd = torch.float64 if (o + i) * r <= FLOAT64_BELOW else torch.float32
        n_buf = min(per, len(keys))
        bufs = (torch.empty(n_buf, o, r, device=device, dtype=wd),
                torch.empty(n_buf, r, i, device=device, dtype=wd))
        for start in range(0, len(keys), per):
            chunk = keys[start:start + per]
            b, a = bufs[0][:len(chunk)], bufs[1][:len(chunk)]
            scale = _fill([items[k] for k in chunk], b, a)
            core = factored_core(b, a, col_scale=scale)
            s_cpu = core.S.cpu()
            if rank_of is None:
                out.update({k: Truncated(None, None, s_cpu[j]) for j, k in enumerate(chunk)})
                continue
            ks = [max(1, min(int(rank_of(k, s_cpu[j])), r)) for j, k in enumerate(chunk)]
            u, vh = back_project(core, b, a, max(ks))  # (n, out, kmax), (n, kmax, in)
            for j, key in enumerate(chunk):
                k = ks[j]
                root = s_cpu[j, :k].clamp_min(0).sqrt().to(device=u.device, dtype=u.dtype)
                dt = out_dtype(key) if out_dtype else torch.float32
                up = (u[j, :, :k] * root).to("cpu", dt).contiguous()  # (out, k)
                down = (root[:, None] * vh[j, :k]).to("cpu", dt).contiguous()  # (k, in)
                out[key] = Truncated(up, down, s_cpu[j])
                if progress:
                    progress(key)
    return out
