"""Resize an adapter: the exact SVD of each update, truncated by a rank policy.

Each module's ``scale * B @ A`` is decomposed exactly from its factors (lowrank engine, batched
over modules of equal shape, chunked so memory stays bounded) and the top ``k`` triplets are kept,
which is the Eckart-Young optimum for that rank. The new factors are balanced,
``B' = U_k S_k^1/2`` and ``A' = S_k^1/2 V_k^T``, with ``alpha = k`` (scale 1) and no rsLoRA flag:
unlike kohya's resize, which keeps the old alpha and scales the factors, the kept update is
exactly the truncated SVD whatever alpha convention the reader applies. Output dtype = input dtype.

Example:
    >>> import lorakit
    >>> from lorakit.lowrank import RankPolicy
    >>> small, report = lorakit.resize(adapter, RankPolicy.fixed(16))   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lorakit.adapter import Adapter, LoraModule, ModuleKind
from lorakit.errors import UnsupportedVariantError
from lorakit.lowrank import RankPolicy, allocate_budget, select_rank
from lorakit.lowrank.device import resolve_device

CHUNK_ELEMENTS = 1 << 22  # factor elements per batched call (bounds the work memory)
FLOAT64_BELOW = 1 << 18  # modules with fewer factor elements are decomposed in float64


@dataclass
class ModuleReport:
    key: str
    rank_before: int
    rank_after: int
    energy_kept: float
    rel_error: float


@dataclass
class ResizeReport:
    """Per-module kept rank, energy kept and relative error, plus totals."""

    modules: list[ModuleReport] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0

    @property
    def total_rel_error(self) -> float:
        """``sqrt(sum err^2 / sum ||delta||^2)`` over all modules."""
        num = sum(m.rel_error ** 2 * self._norm2.get(m.key, 0.0) for m in self.modules)
        den = sum(self._norm2.values())
        return (num / den) ** 0.5 if den > 0 else 0.0

    _norm2: dict[str, float] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "params_before": self.params_before, "params_after": self.params_after,
            "total_rel_error": self.total_rel_error,
            "modules": [vars(m) for m in self.modules],
        }


def _groups(adapter: Adapter) -> dict[tuple, list[str]]:
    """Module keys grouped by (update shape, rank, kind) so each group is one batched call."""
    groups: dict[tuple, list[str]] = {}
    for key, m in adapter.modules.items():
        sig = (m.out_features, m.down_matrix().shape[1], m.rank, m.kind.value)
        groups.setdefault(sig, []).append(key)
    return groups


def _chunks(keys: list[str], per: int) -> list[list[str]]:
    return [keys[i:i + per] for i in range(0, len(keys), per)]


def _fill(mods: list[LoraModule], b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Copy factors into reused work buffers ``b (n, out, r)``, ``a (n, r, in*k)``; scales."""
    for j, m in enumerate(mods):
        b[j].copy_(m.up_matrix())  # converts in the copy: one pass, no temporaries
        a[j].copy_(m.down_matrix())
    return torch.tensor([m.scale for m in mods], dtype=torch.float64)


def _run(adapter: Adapter, device: torch.device, rank_of: Callable[[str, torch.Tensor], int],
         progress, keep_factors: bool, dtype: torch.dtype | None = None) -> dict[str, tuple]:
    """Per module: the spectrum S and, if ``keep_factors``, the top ``rank_of(key, S)`` triplets.

    Modules are batched by shape in chunks of ``CHUNK_ELEMENTS`` factor entries through buffers
    reused across chunks; only the kept columns of U and V survive a chunk, so peak memory stays
    near the input plus one chunk.
    """
    from lorakit.lowrank.factored import back_project, factored_core

    out: dict[str, tuple] = {}
    for (o, i, r, _), keys in _groups(adapter).items():
        per = max(1, CHUNK_ELEMENTS // max(1, (o + i) * r))
        # small modules: float64 everywhere (exact spectra and reports, negligible cost); large
        # ones: float32 tall products (2-3x faster; truncation error still within 1e-6)
        wd = torch.float64 if (o + i) * r <= FLOAT64_BELOW else torch.float32
        bufs = (torch.empty(min(per, len(keys)), o, r, device=device, dtype=wd),
                torch.empty(min(per, len(keys)), r, i, device=device, dtype=wd))
        for chunk in _chunks(keys, per):
            n = len(chunk)
            b, a = bufs[0][:n], bufs[1][:n]
            scales = _fill([adapter.modules[k] for k in chunk], b, a)
            core = factored_core(b, a, scales)
            s_cpu = core.S.cpu()
            if not keep_factors:
                out.update({k: (None, s_cpu[j], None) for j, k in enumerate(chunk)})
                continue
            ks = [max(1, min(rank_of(k, s_cpu[j]), r)) for j, k in enumerate(chunk)]
            u, vh = back_project(core, b, a, max(ks))
            for j, k in enumerate(chunk):
                m = adapter.modules[k]
                # built right away in the output dtype: no float32 U/V outlive their chunk
                new = _new_module(m, u[j], s_cpu[j], vh[j], ks[j], dtype or m.dtype)
                out[k] = (new, s_cpu[j])
                if progress:
                    progress(k)
    return out


def _new_module(m: LoraModule, u, s, vh, k: int, dtype: torch.dtype) -> LoraModule:
    root = s[:k].clamp_min(0).sqrt().to(device=u.device, dtype=u.dtype)  # (k,)
    up = (u[:, :k] * root).to("cpu", dtype)  # (out, k)
    down = (root[:, None] * vh[:k]).to("cpu", dtype)  # (k, in*kh*kw)
    if m.kind is ModuleKind.CONV:
        up = up.reshape(up.shape[0], k, 1, 1)
        down = down.reshape(k, *m.down.shape[1:])
    return LoraModule(down=down.contiguous(), up=up.contiguous(), alpha=float(k), kind=m.kind,
                      bias=m.bias)


def _rank_fn(adapter: Adapter, policy: RankPolicy, device: torch.device, progress
             ) -> Callable[[str, torch.Tensor], int]:
    """How many triplets each module keeps (a budget needs every spectrum first)."""
    if policy.is_budget:
        spectra = _run(adapter, device, lambda k, s: 0, None, keep_factors=False)
        costs = {k: m.out_features + m.down_matrix().shape[1]
                 for k, m in adapter.modules.items()}
        budget = policy.budget_params(adapter.num_params())
        ranks = allocate_budget({k: v[1] for k, v in spectra.items()}, costs, budget)
        return lambda key, s: ranks[key]

    def per_module(key: str, s: torch.Tensor) -> int:
        m = adapter.modules[key]
        p = policy.for_conv() if (m.kind is ModuleKind.CONV and m.kernel != (1, 1)) else policy
        return select_rank(s, p)

    return per_module


def resize(adapter: Adapter, policy: RankPolicy, *, device: str = "auto",
           dtype: torch.dtype | None = None,
           progress: Callable[[str], None] | None = None) -> tuple[Adapter, ResizeReport]:
    """Resize every module of ``adapter`` by ``policy``; returns the new adapter and a report.

    Ranks never grow: a policy asking for more than a module's rank keeps it whole (exactly).

    Example:
        >>> small, rep = resize(adapter, RankPolicy.from_options(energy=0.99))   # doctest: +SKIP
        >>> rep.to_dict()["total_rel_error"]                                     # doctest: +SKIP
    """
    for key, m in adapter.modules.items():
        if m.magnitude is not None:
            raise UnsupportedVariantError(
                "DoRA module: resizing changes the direction its magnitude vector normalises",
                path=adapter.source, key=key)
    dev = resolve_device(device)
    results = _run(adapter, dev, _rank_fn(adapter, policy, dev, progress), progress,
                   keep_factors=True, dtype=dtype)
    report = ResizeReport(params_before=adapter.num_params())
    modules: dict[str, LoraModule] = {}
    for key, m in adapter.modules.items():
        new, s = results[key]
        k = new.rank
        modules[key] = new
        e = s.double().pow(2)
        total = float(e.sum())
        dropped = float(e[k:].sum())  # summed directly: no cancellation when little is dropped
        report._norm2[key] = total
        report.modules.append(ModuleReport(
            key, m.rank, k, 1.0 - dropped / total if total > 0 else 1.0,
            (dropped / total) ** 0.5 if total > 0 else 0.0))
    out = adapter.copy(modules=modules)
    report.params_after = out.num_params()
    return out, report
