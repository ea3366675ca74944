"""Resize an adapter: the exact SVD of each update, truncated by a rank policy.

Each module's ``scale * B @ A`` is decomposed exactly from its factors (lowrank engine, batched
over modules of equal shape, chunked so memory stays bounded) and the top ``k`` triplets are kept,
which is the Eckart-Young optimum for that rank.

Alpha convention (kohya's ``resize_lora.py``): the module keeps its scale, so the new alpha is
``scale * k`` (``scale * sqrt(k)`` for rsLoRA, whose flag is kept): rank 64 / alpha 128 becomes
rank 16 / alpha 32, and an adapter with one alpha/rank ratio keeps it at any new ranks. kohya puts
all of ``S`` into ``lora_up``; lorakit splits it evenly, ``B' = U_k (S_k / scale)^1/2`` and
``A' = (S_k / scale)^1/2 V_k^T`` (balanced factors: the same range in both, best for fp16/bf16).
Either way ``scale * B' @ A' = U_k S_k V_k^T``. Every module keeps its scale, whatever its sign: a
negative alpha stays negative (the factors are split with ``|scale|`` and ``B'`` takes the sign),
and a zero alpha stays zero (its update is zero, and so are the new factors). Output dtype = input
dtype unless asked.

Example:
    >>> import lorakit
    >>> from lorakit.lowrank import RankPolicy
    >>> small, report = lorakit.resize(adapter, RankPolicy.fixed(16))   # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lorakit.adapter import Adapter, LoraModule, ModuleKind
from lorakit.errors import UnsupportedVariantError
from lorakit.lowrank.batched import truncated_sums
from lorakit.lowrank.device import resolve_device
from lorakit.lowrank.factored import Core
from lorakit.lowrank.policy import RankPolicy, allocate_budget, select_rank

CORE_CACHE_BYTES = 1 << 29  # a budget keeps the small cores between its two passes up to this


@dataclass
class ModuleReport:
    """One module: ranks before/after, fraction of ``||delta||_F^2`` kept, relative error."""

    key: str
    rank_before: int
    rank_after: int
    energy_kept: float
    rel_error: float  # ||delta - delta_k||_F / ||delta||_F (0 for an all-zero update)


@dataclass
class ResizeReport:
    """Per-module kept rank, energy kept and relative error, plus totals.

    Example:
        >>> rep = ResizeReport([ModuleReport("q", 8, 4, 0.99, 0.1)], 100, 50, _norm2={"q": 4.0})
        >>> round(rep.total_rel_error, 3), rep.to_dict()["params_after"]
        (0.1, 50)
    """

    modules: list[ModuleReport] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    _norm2: dict[str, float] = field(default_factory=dict, repr=False)  # ||delta||_F^2 per key

    @property
    def total_rel_error(self) -> float:
        """``sqrt(sum err^2 / sum ||delta||^2)`` over all modules."""
        num = sum(m.rel_error ** 2 * self._norm2.get(m.key, 0.0) for m in self.modules)
        den = sum(self._norm2.values())
        return math.sqrt(num / den) if den > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: totals first, then one dict per module."""
        err = self.total_rel_error
        return {
            "n_modules": len(self.modules),
            "params_before": self.params_before, "params_after": self.params_after,
            "total_rel_error": err, "total_energy_kept": 1.0 - err * err,
            "modules": [vars(m) for m in self.modules],
        }


def _split_scale(m: LoraModule) -> float:
    """The positive scale the new factors are balanced for: ``|scale|`` (1 for a zero scale,
    whose update and new factors are zero)."""
    s = abs(m.scale)
    return s if (s > 0 and math.isfinite(s)) else 1.0


def _module(m: LoraModule, up: torch.Tensor, down: torch.Tensor) -> LoraModule:
    """The resized module from matrix factors for ``_split_scale(m)``, in ``m``'s layout: it keeps
    ``m``'s scale (sign included) and rsLoRA flag."""
    k = down.shape[0]
    scale = m.scale
    rslora = m.rslora
    alpha = scale * (math.sqrt(k) if rslora else k)
    if scale < 0:
        up = -up  # (out, k): scale * (-U (S/|scale|)^1/2) ((S/|scale|)^1/2 V^T) = U S V^T
    if m.kind is ModuleKind.CONV:
        up, down = up.reshape(up.shape[0], k, 1, 1), down.reshape(k, *m.down.shape[1:])
    return LoraModule(down=down, up=up, alpha=alpha, rslora=rslora, kind=m.kind, bias=m.bias)


def _policy_for(m: LoraModule, policy: RankPolicy) -> RankPolicy:
    """``--conv-rank`` applies to conv modules with a spatial kernel (kohya's 3x3 'conv' LoRA)."""
    return policy.for_conv() if (m.kind is ModuleKind.CONV and m.kernel != (1, 1)) else policy


def _rank_fn(adapter: Adapter, policy: RankPolicy, terms: dict[str, list], device: torch.device,
             cores: dict[str, Core]) -> Callable[[str, torch.Tensor], int]:
    """How many triplets each module keeps (a budget needs every spectrum first)."""
    if policy.is_budget:
        spectra = truncated_sums(terms, None, device=device, cores=cores)
        costs = {k: m.out_features + m.down_matrix().shape[1] for k, m in adapter.modules.items()}
        ranks = allocate_budget({k: v.S for k, v in spectra.items()}, costs,
                                policy.budget_params(adapter.num_params()),
                                min_rank=policy.min_rank)
        return lambda key, s: ranks[key]

    def per_module(key: str, s: torch.Tensor) -> int:
        m = adapter.modules[key]
        return min(select_rank(s, _policy_for(m, policy)), m.rank)

    return per_module


def _check_supported(adapter: Adapter) -> None:
    for key, m in adapter.modules.items():
        if m.magnitude is not None:
            raise UnsupportedVariantError(
                "DoRA module: resizing changes the direction its magnitude vector normalises",
                path=adapter.source, key=key, hint="merge the DoRA adapter into the base first")


def resize(adapter: Adapter, policy: RankPolicy, *, device: str = "auto",
           dtype: torch.dtype | None = None,
           progress: Callable[[str], None] | None = None) -> tuple[Adapter, ResizeReport]:
    """Resize every module of ``adapter`` by ``policy``; returns the new adapter and a report.

    Ranks never grow: a policy asking for more than a module's rank keeps it whole (exactly).
    The input is not modified; extras, config and metadata are carried over (copied), and the
    format writers derive rank/alpha patterns from the new modules. ``progress(key)`` is called
    once per module. DoRA modules raise :class:`UnsupportedVariantError` naming the key.

    Example:
        >>> small, rep = resize(adapter, RankPolicy.from_options(energy=0.99))   # doctest: +SKIP
        >>> rep.to_dict()["total_rel_error"]                                     # doctest: +SKIP
    """
    _check_supported(adapter)
    dev = resolve_device(device)
    terms = {k: [(m.up_matrix(), m.down_matrix(), m.scale)] for k, m in adapter.modules.items()}
    core_bytes = sum(24 * m.rank ** 2 for m in adapter.modules.values())
    cores: dict[str, Core] | None = {} if core_bytes <= CORE_CACHE_BYTES else None
    results = truncated_sums(terms, _rank_fn(adapter, policy, terms, dev, cores), device=dev,
                             out_dtype=lambda key: dtype or adapter.modules[key].dtype,
                             out_scale=lambda key: _split_scale(adapter.modules[key]),
                             progress=progress, cores=cores)
    report = ResizeReport(params_before=adapter.num_params())
    modules: dict[str, LoraModule] = {}
    for key, m in adapter.modules.items():
        res = results[key]
        modules[key] = _module(m, res.up, res.down)
        k = modules[key].rank
        e = res.S.double().pow(2)  # (R,)
        total = float(e.sum())
        dropped = float(e[k:].sum())  # summed directly: no cancellation when little is dropped
        report._norm2[key] = total
        report.modules.append(ModuleReport(
            key, m.rank, k, 1.0 - dropped / total if total > 0 else 1.0,
            math.sqrt(dropped / total) if total > 0 else 0.0))
    out = adapter.copy(modules=modules)
    report.params_after = out.num_params()
    return out, report
