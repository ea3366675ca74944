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
from lorakit.lowrank.batched import truncated_sums
from lorakit.lowrank.device import resolve_device


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


def _terms(adapter: Adapter) -> dict[str, list]:
    return {k: [(m.up_matrix(), m.down_matrix(), m.scale)] for k, m in adapter.modules.items()}


def _module(m: LoraModule, up: torch.Tensor, down: torch.Tensor) -> LoraModule:
    """A scale-1 module (``alpha = k``) from balanced matrix factors, in ``m``'s layout."""
    k = down.shape[0]
    if m.kind is ModuleKind.CONV:
        up, down = up.reshape(up.shape[0], k, 1, 1), down.reshape(k, *m.down.shape[1:])
    return LoraModule(down=down, up=up, alpha=float(k), kind=m.kind, bias=m.bias)


def _rank_fn(adapter: Adapter, policy: RankPolicy, device: torch.device
             ) -> Callable[[str, torch.Tensor], int]:
    """How many triplets each module keeps (a budget needs every spectrum first)."""
    if policy.is_budget:
        spectra = truncated_sums(_terms(adapter), None, device=device)
        costs = {k: m.out_features + m.down_matrix().shape[1]
                 for k, m in adapter.modules.items()}
        budget = policy.budget_params(adapter.num_params())
        ranks = allocate_budget({k: v.S for k, v in spectra.items()}, costs, budget)
        return lambda key, s: ranks[key]

    def per_module(key: str, s: torch.Tensor) -> int:
        m = adapter.modules[key]
        p = policy.for_conv() if (m.kind is ModuleKind.CONV and m.kernel != (1, 1)) else policy
        return min(select_rank(s, p), m.rank)

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
    results = truncated_sums(_terms(adapter), _rank_fn(adapter, policy, dev), device=dev,
                             out_dtype=lambda key: dtype or adapter.modules[key].dtype,
                             progress=progress)
    report = ResizeReport(params_before=adapter.num_params())
    modules: dict[str, LoraModule] = {}
    for key, m in adapter.modules.items():
        res = results[key]
        new = _module(m, res.up, res.down)
        k = new.rank
        modules[key] = new
        e = res.S.double().pow(2)
        total = float(e.sum())
        dropped = float(e[k:].sum())  # summed directly: no cancellation when little is dropped
        report._norm2[key] = total
        report.modules.append(ModuleReport(
            key, m.rank, k, 1.0 - dropped / total if total > 0 else 1.0,
            (dropped / total) ** 0.5 if total > 0 else 0.0))
    out = adapter.copy(modules=modules)
    report.params_after = out.num_params()
    return out, report
