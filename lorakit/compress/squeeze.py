"""LoRA-Squeeze: post-hoc compression of a trained LoRA ("Post-Squeeze") and a few recovery
steps at the target rank ("Cont-Squeeze").

Vulić et al., "LoRA-Squeeze: Simple and Effective Post-Tuning and In-Tuning Compression of LoRA
Modules" (arXiv 2602.10993): train at a higher rank, then compress each module to a lower rank by
an SVD of its update ``scale * B @ A``; optionally train a few steps at the new rank. The paper
reconstructs the dense update and runs a randomized SVD. lorakit offers that route
(``RANDOMIZED``) and, by default, the exact factored route (``EXACT``, the same engine as
:func:`lorakit.resize`): for a LoRA the update's SVD comes from the factors alone, exactly and
without forming the ``out x in`` matrix. ``AUTO`` picks ``EXACT``: every input here is a LoRA.

Both routes keep the top singular triplets the rank policy picks and write balanced factors,
``B' = U_k S_k^1/2`` and ``A' = S_k^1/2 V_k^T`` with ``alpha = k`` (scale 1), in the input dtype.
The randomized route reconstructs one module's update at a time (peak memory: one dense update)
and computes ``min(rank, r)`` triplets for a fixed rank, all ``r`` (the update's rank bound) for
the other policies.

In-tuning annealing ("In-Squeeze") lives in :mod:`lorakit.compress.anneal`.

Example:
    >>> from lorakit.compress.squeeze import squeeze, SqueezeRoute
    >>> small, report = squeeze(adapter, RankPolicy.fixed(8))                      # doctest: +SKIP
    >>> small, report = squeeze(adapter, RankPolicy.fixed(8),
    ...                         method=SqueezeRoute.RANDOMIZED, seed=1)             # doctest: +SKIP
"""

from __future__ import annotations

import enum
import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from lorakit.adapter import Adapter, LoraModule, ModuleKind
from lorakit.compress.resize import ModuleReport, ResizeReport, resize
from lorakit.errors import NonFiniteError, OptionError, UnsupportedVariantError
from lorakit.lowrank import (
    RankPolicy,
    allocate_budget,
    randomized_svd,
    resolve_device,
    select_rank,
)


class SqueezeRoute(str, enum.Enum):
    """How the SVD of each update is computed."""

    AUTO = "auto"  # EXACT for LoRA inputs (all of them today)
    EXACT = "exact"  # from the factors, no dense update (lorakit.resize)
    RANDOMIZED = "randomized"  # the paper's route: dense update, randomized SVD


@dataclass(frozen=True)
class SqueezeOptions:
    """Options of :func:`squeeze`, shared by the API and the CLI.

    Fields:
        method: the SVD route.
        oversample: extra random columns of the randomized range finder.
        n_iter: power iterations of the randomized SVD.
        seed: seed of the randomized SVD's test matrix (same seed, same bytes).
        device: ``auto``, ``cpu`` or ``cuda``.
        dtype: output dtype (None: each module's input dtype).

    Example:
        >>> SqueezeOptions(method="randomized").method
        <SqueezeRoute.RANDOMIZED: 'randomized'>
    """

    method: SqueezeRoute = SqueezeRoute.AUTO
    oversample: int = 10
    n_iter: int = 2
    seed: int = 0
    device: str = "auto"
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "method", SqueezeRoute(self.method))
        except ValueError as e:
            raise OptionError(f"unknown squeeze method {self.method!r} (use "
                              f"{', '.join(r.value for r in SqueezeRoute)})", key="method") from e
        if self.oversample < 0 or self.n_iter < 0:
            raise OptionError(f"oversample and n_iter must be >= 0, got {self.oversample} and "
                              f"{self.n_iter}", key="oversample")

    @property
    def route(self) -> SqueezeRoute:
        """The route actually taken (AUTO resolved)."""
        return SqueezeRoute.EXACT if self.method is SqueezeRoute.AUTO else self.method


@dataclass
class SqueezeReport(ResizeReport):
    """The resize report (per-module ranks, energy kept, relative error) plus the route taken."""

    route: str = SqueezeRoute.EXACT.value

    def to_dict(self) -> dict[str, Any]:
        return {"route": self.route, **super().to_dict()}


def _policy_for(m: LoraModule, policy: RankPolicy) -> RankPolicy:
    return policy.for_conv() if (m.kind is ModuleKind.CONV and m.kernel != (1, 1)) else policy


@dataclass
class _Triplets:
    U: torch.Tensor  # (out, p)
    S: torch.Tensor  # (p,) float64, descending
    Vh: torch.Tensor  # (p, in * kh * kw)
    norm2: float  # ||delta||_F^2, exact


def _randomized_triplets(m: LoraModule, cap: int, opts: SqueezeOptions,
                         device: torch.device) -> _Triplets:
    """Top-``cap`` triplets of the module's reconstructed update (one dense matrix alive)."""
    b = m.up_matrix(torch.float32).to(device)  # (out, r)
    a = m.down_matrix(torch.float32).to(device)  # (r, in * k)
    delta = m.scale * (b @ a)  # (out, in * k)
    norm2 = float(delta.double().pow(2).sum())
    u, s, vh = randomized_svd(delta, cap, oversample=opts.oversample, n_iter=opts.n_iter,
                              seed=opts.seed)
    del delta
    return _Triplets(u.cpu(), s.double().cpu(), vh.cpu(), norm2)


def _squeeze_randomized(adapter: Adapter, policy: RankPolicy, opts: SqueezeOptions,
                        progress: Callable[[str], None] | None) -> tuple[Adapter, SqueezeReport]:
    dev = resolve_device(opts.device)
    trips: dict[str, _Triplets] = {}
    for key, m in adapter.modules.items():
        if progress:
            progress(key)
        p = _policy_for(m, policy)
        cap = min(p.rank, m.rank) if p.is_fixed else m.rank
        trips[key] = _randomized_triplets(m, cap, opts, dev)
    if policy.is_budget:
        costs = {k: m.out_features + m.down_matrix().shape[1] for k, m in adapter.modules.items()}
        ranks = allocate_budget({k: t.S for k, t in trips.items()}, costs,
                                policy.budget_params(adapter.num_params()))
    else:
        ranks = {k: select_rank(t.S, _policy_for(adapter.modules[k], policy))
                 for k, t in trips.items()}
    report = SqueezeReport(params_before=adapter.num_params(), route=SqueezeRoute.RANDOMIZED.value)
    modules: dict[str, LoraModule] = {}
    for key, m in adapter.modules.items():
        t = trips.pop(key)
        k = max(1, min(ranks[key], m.rank, int(t.S.numel())))
        root = t.S[:k].clamp_min(0).sqrt().to(t.U.dtype)  # (k,)
        up = t.U[:, :k] * root  # (out, k)
        down = root[:, None] * t.Vh[:k]  # (k, in * kh * kw)
        out_dtype = opts.dtype or m.dtype
        if m.kind is ModuleKind.CONV:
            up, down = up.reshape(-1, k, 1, 1), down.reshape(k, *m.down.shape[1:])
        modules[key] = LoraModule(down=down.to(out_dtype).contiguous(),
                                  up=up.to(out_dtype).contiguous(), alpha=float(k),
                                  kind=m.kind, bias=m.bias)
        e = t.S.pow(2)
        # the tail the computed triplets hold, plus what they missed of the exact total
        dropped = float(e[k:].sum()) + max(t.norm2 - float(e.sum()), 0.0)
        total = t.norm2
        report._norm2[key] = total
        report.modules.append(ModuleReport(
            key, m.rank, k, 1.0 - dropped / total if total > 0 else 1.0,
            math.sqrt(dropped / total) if total > 0 else 0.0))
    out = adapter.copy(modules=modules)
    report.params_after = out.num_params()
    return out, report


def squeeze(adapter: Adapter, policy: RankPolicy, *,
            method: SqueezeRoute | str = SqueezeRoute.AUTO, oversample: int = 10,
            n_iter: int = 2, seed: int = 0, device: str = "auto",
            dtype: torch.dtype | None = None,
            progress: Callable[[str], None] | None = None) -> tuple[Adapter, SqueezeReport]:
    """Post-hoc LoRA-Squeeze: compress every module of ``adapter`` to the rank ``policy`` picks.

    Inputs are not modified; ranks never grow. DoRA modules are refused.

    Example:
        >>> small, rep = squeeze(adapter, RankPolicy.from_options(energy=0.95),
        ...                      method="randomized", seed=0)                 # doctest: +SKIP
        >>> rep.to_dict()["route"]                                             # doctest: +SKIP
        'randomized'
    """
    opts = SqueezeOptions(method=method, oversample=oversample, n_iter=n_iter, seed=seed,
                          device=device, dtype=dtype)
    return squeeze_with(adapter, policy, opts, progress=progress)


def squeeze_with(adapter: Adapter, policy: RankPolicy, options: SqueezeOptions, *,
                 progress: Callable[[str], None] | None = None
                 ) -> tuple[Adapter, SqueezeReport]:
    """:func:`squeeze` with an options object (what the CLI and recipes build).

    Example:
        >>> squeeze_with(adapter, RankPolicy.fixed(4), SqueezeOptions())      # doctest: +SKIP
    """
    for key, m in adapter.modules.items():
        if m.magnitude is not None:
            raise UnsupportedVariantError(
                "DoRA module: squeezing changes the direction its magnitude vector normalises",
                path=adapter.source, key=key)
    if options.route is SqueezeRoute.RANDOMIZED:
        return _squeeze_randomized(adapter, policy, options, progress)
    out, rep = resize(adapter, policy, device=options.device, dtype=options.dtype,
                      progress=progress)
    report = SqueezeReport(modules=rep.modules, params_before=rep.params_before,
                           params_after=rep.params_after, _norm2=rep._norm2,
                           route=SqueezeRoute.EXACT.value)
    return out, report


# ----------------------------------------------------------------------------- Cont-Squeeze


@dataclass
class RecoveryResult:
    """The losses of the recovery steps and the cut made before them (None without a cut)."""

    losses: list[float] = field(default_factory=list)
    shrink: Any = None  # lorakit.compress.anneal.ShrinkReport


def continue_training(model: torch.nn.Module,
                      loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
                      batches: Iterable[Any], steps: int, lr: float = 1e-4, *,
                      rank: int | RankPolicy | None = None, adapter_name: str = "default",
                      optimizer: torch.optim.Optimizer | None = None) -> RecoveryResult:
    """Cont-Squeeze: optionally shrink a PEFT model's LoRA layers in place to ``rank`` (exact
    SVD, see :func:`lorakit.compress.anneal.shrink_peft_model`), then run ``steps`` optimizer
    steps at that rank on ``loss_fn(model, batch)``, cycling through ``batches``.

    Without ``optimizer``, an AdamW (no weight decay) over the model's trainable parameters is
    created after the cut. A given optimizer is kept in step with the cut (its state for the
    replaced factors is reset). A non-finite loss stops with :class:`NonFiniteError`. To recover
    a squeezed file, load it with ``PeftModel.from_pretrained(base, path, is_trainable=True)``.

    Example:
        >>> res = continue_training(peft_model, lambda m, b: m(**b).loss, batches, steps=20,
        ...                         lr=1e-4, rank=8)                          # doctest: +SKIP
        >>> res.losses[-1] < res.losses[0]                                    # doctest: +SKIP
        True
    """
    from lorakit.compress.anneal import shrink_peft_model

    if steps < 0 or not lr > 0:
        raise OptionError(f"steps must be >= 0 and lr > 0, got {steps} and {lr}", key="steps")
    result = RecoveryResult()
    if rank is not None:
        result.shrink = shrink_peft_model(model, rank, adapter_name, optimizer)
    if optimizer is None:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise OptionError("the model has no trainable parameters", key="model",
                              hint="load the adapter with is_trainable=True")
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    stream = itertools.cycle(batches) if isinstance(batches, (list, tuple)) else iter(batches)
    for i in range(steps):
        try:
            batch = next(stream)
        except StopIteration:
            raise OptionError(f"batches ran out after {i} of {steps} steps", key="batches",
                              hint="pass a list (it is cycled) or a longer iterator") from None
        loss = loss_fn(model, batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteError(f"loss is {value} at recovery step {i}", key="loss",
                                 hint="lower lr")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(value)
    return result
