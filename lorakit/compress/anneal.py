"""In-tuning rank annealing (LoRA-Squeeze's "In-Squeeze") for a PEFT LoRA model.

Train at a generous rank, then shrink every LoRA layer on a schedule (geometric by default,
e.g. 64 -> 32 -> 16 -> 8) while training goes on. Each cut replaces a layer's ``lora_A`` /
``lora_B`` by rank-``k`` factors from the exact SVD of its update ``c * B @ A`` (computed from the
factors: ``O((out + in) r^2)``, never the dense ``out x in`` matrix), so the layer function right
after the cut is the Eckart-Young optimal rank-``k`` truncation of the function before it.

Conventions:

* Balanced split. With ``c * B @ A = U S V^T`` and the new scaling ``c'``:
  ``B' = U_k (S_k / c')^1/2`` and ``A' = (S_k / c')^1/2 V_k^T``, so ``c' B' A'`` is the truncation.
* Scaling (:class:`ScaleRule`). ``KEEP_SCALE`` (default) keeps ``c' = c`` and sets
  ``lora_alpha = c * k`` (``c * sqrt(k)`` with rsLoRA), so the factors keep the learning dynamics
  they were trained with; ``KEEP_ALPHA`` keeps ``lora_alpha`` and lets ``c' = alpha / k``.
  Either way the layer's ``r``, ``lora_alpha`` and ``scaling`` are consistent, and the PeftModel's
  config (``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``) is rewritten so
  ``save_pretrained`` writes an adapter that reloads with the new ranks.
* Null directions. Where the update has fewer than ``k`` nonzero singular values (a layer still
  at its zero initialisation), the spare directions restart like a fresh LoRA pair: the ``A`` row
  is drawn as PEFT draws it (uniform, bound ``1/sqrt(in)``, seeded) and the ``B`` column is zero.
  The layer function is unchanged and gradients still reach them (a zero ``A`` row with a zero
  ``B`` column would be a saddle that training never leaves).
* Optimizer (:class:`OptimizerState`). The new factors are new ``nn.Parameter`` objects; the
  optimizer's ``param_groups`` are updated in place to point at them. ``RESET`` drops the old
  parameters' state (the new ones start fresh, as after re-creating the optimizer). ``PROJECT``
  carries the state over through the chain rule at the cut: with ``B' = B M_b`` and
  ``A' = M_a A``, a gradient maps as ``g_B' = (c'/c) g_B M_a^T`` and ``g_A' = (c'/c) M_b^T g_A``.
  First moments (``exp_avg``, ``momentum_buffer``) go through these maps (exact for the gradient
  at the cut); second moments (``exp_avg_sq``, ...) go through the element-wise squared maps,
  which treats the mixed gradient coordinates as uncorrelated
  (``E[(sum_j M_jk g_j)^2] ~ sum_j M_jk^2 E[g_j^2]``) and is nonnegative by construction.
  Scalars such as Adam's ``step`` are kept.

Only plain LoRA on ``nn.Linear`` / GPT-2 ``Conv1D`` layers (PEFT's ``lora.Linear``) is handled;
DoRA, other LoRA variants, AdaLoRA, embedding and conv LoRA, quantized layers and merged adapters
are refused by name. Cut after ``optimizer.step()`` and ``zero_grad()`` (gradients of the old
parameters are not carried over), in a single process (DDP/FSDP wrappers hold the old parameters).

Example:
    >>> schedule = geometric_schedule(64, 8, 3, total_steps=1000)
    >>> schedule
    [(250, 32), (500, 16), (750, 8)]
    >>> annealer = RankAnnealer(schedule, optimizer_state="project")
    >>> for step in range(1000):                                   # doctest: +SKIP
    ...     loss = loss_fn(model, next(batches)); loss.backward()
    ...     optimizer.step(); optimizer.zero_grad()
    ...     annealer.step(step + 1, model, optimizer)   # optimizer steps done so far
    >>> trainer.add_callback(annealer.trainer_callback())          # doctest: +SKIP
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lorakit.errors import MissingDependencyError, OptionError, UnsupportedVariantError
from lorakit.lowrank import RankPolicy, allocate_budget, select_rank
from lorakit.lowrank.factored import factored_core


class OptimizerState(str, enum.Enum):
    """What happens to the optimizer state of the factors a cut replaces."""

    RESET = "reset"
    PROJECT = "project"


class ScaleRule(str, enum.Enum):
    """Which of the layer's scaling and ``lora_alpha`` a cut keeps (the other follows)."""

    KEEP_SCALE = "keep_scale"
    KEEP_ALPHA = "keep_alpha"


# optimizer state entries shaped like the parameter, by how they transform (see module doc)
FIRST_MOMENTS = frozenset({"exp_avg", "momentum_buffer", "grad_avg"})
SECOND_MOMENTS = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum"})


# ----------------------------------------------------------------------------- schedules


def geometric_schedule(start: int, end: int, n_cuts: int | None, total_steps: int,
                       start_step: int = 0, end_step: int | None = None
                       ) -> list[tuple[int, int]]:
    """Cuts ``[(step, rank), ...]`` from rank ``start`` down to ``end`` in ``n_cuts`` geometric
    steps (``None``: one halving per cut), spread so that every rank, the first and the last
    included, trains for an equal share of ``[start_step, end_step)`` (``end_step`` defaults to
    ``total_steps``; the last rank goes on to the end). A cut at ``step`` happens once ``step``
    optimizer steps are done.

    Example:
        >>> geometric_schedule(64, 8, 3, 1000)
        [(250, 32), (500, 16), (750, 8)]
        >>> geometric_schedule(8, 2, None, 30)
        [(10, 4), (20, 2)]
    """
    end_step = total_steps if end_step is None else end_step
    if not (int(start) == start and int(end) == end and start > end >= 1):
        raise OptionError(f"ranks must satisfy start > end >= 1, got start={start}, end={end}",
                          key="schedule")
    start, end = int(start), int(end)
    if n_cuts is None:
        n_cuts = max(1, round(math.log2(start / end)))
    if not 1 <= n_cuts <= start - end:
        raise OptionError(f"n_cuts must be in [1, {start - end}] for {start} -> {end}, got "
                          f"{n_cuts}", key="n_cuts")
    if not 0 <= start_step < end_step <= total_steps:
        raise OptionError(f"steps must satisfy 0 <= start_step < end_step <= total_steps, got "
                          f"{start_step}, {end_step}, {total_steps}", key="schedule")
    span = end_step - start_step
    if span < n_cuts + 1:
        raise OptionError(f"{n_cuts} cuts need at least {n_cuts + 1} steps between start_step and"
                          f" end_step, got {span}", key="schedule")
    ranks: list[int] = []
    prev = start
    for i in range(1, n_cuts + 1):
        r = round(start * (end / start) ** (i / n_cuts))
        r = max(min(r, prev - 1), end + (n_cuts - i))  # strictly decreasing, room for the rest
        ranks.append(r)
        prev = r
    steps = [start_step + round(i * span / (n_cuts + 1)) for i in range(1, n_cuts + 1)]
    return list(zip(steps, ranks, strict=True))


def check_schedule(schedule: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Validate a hand-written schedule: steps increasing, ranks decreasing, all >= 1."""
    out = [(int(s), int(r)) for s, r in schedule]
    if not out:
        raise OptionError("the rank schedule is empty", key="schedule")
    for (s0, r0), (s1, r1) in zip(out, out[1:], strict=False):
        if not (s1 > s0 and r1 < r0):
            raise OptionError(f"schedule entries must have increasing steps and decreasing ranks"
                              f", got ({s0}, {r0}) then ({s1}, {r1})", key="schedule")
    if out[0][0] < 0 or out[-1][1] < 1:
        raise OptionError(f"schedule steps must be >= 0 and ranks >= 1, got {out}",
                          key="schedule")
    return out


# ----------------------------------------------------------------------------- reports


@dataclass
class LayerCut:
    """One layer's cut: ranks, the energy of ``c * B @ A`` kept and the relative error."""

    name: str
    rank_before: int
    rank_after: int
    energy_kept: float
    rel_error: float


@dataclass
class ShrinkReport:
    """What :func:`shrink_peft_model` did, per LoRA layer (unchanged layers included)."""

    layers: list[LayerCut] = field(default_factory=list)
    optimizer_state: str | None = None

    def ranks(self) -> dict[str, int]:
        return {c.name: c.rank_after for c in self.layers}

    def to_dict(self) -> dict[str, Any]:
        return {"optimizer_state": self.optimizer_state, "layers": [vars(c) for c in self.layers]}


# ----------------------------------------------------------------------------- PEFT surgery


def _peft_root(model: nn.Module, adapter: str) -> tuple[nn.Module, Any]:
    """The module whose ``named_modules`` names PEFT's patterns use, and the LoraConfig (None
    for a bare model with injected layers)."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    tuner = model.base_model if isinstance(model, PeftModel) else model
    if not isinstance(tuner, BaseTuner):
        return model, None
    config = tuner.peft_config.get(adapter)
    if config is None:
        raise OptionError(f"no adapter named {adapter!r} (the model has "
                          f"{sorted(tuner.peft_config)})", key="adapter_name")
    kind = str(getattr(config.peft_type, "value", config.peft_type))
    if kind != "LORA":
        raise UnsupportedVariantError(f"{kind} adapter: rank annealing handles plain LoRA",
                                      key=adapter)
    if getattr(config, "use_dora", False):
        raise UnsupportedVariantError("DoRA adapter: a cut changes the direction its magnitude "
                                      "vector normalises", key=adapter)
    return tuner.model, config


def lora_layers(model: nn.Module, adapter_name: str = "default") -> dict[str, nn.Module]:
    """Every PEFT LoRA layer holding ``adapter_name``, by module name; refuses (all at once, by
    name) the layer types and variants a cut cannot honour.

    Example:
        >>> {k: l.r["default"] for k, l in lora_layers(peft_model).items()}   # doctest: +SKIP
        {'model.layers.0.self_attn.q_proj': 8, ...}
    """
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.layer import LoraLayer

    root, _ = _peft_root(model, adapter_name)
    layers: dict[str, nn.Module] = {}
    problems: list[str] = []
    for name, mod in root.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        if adapter_name not in mod.lora_A and adapter_name not in mod.lora_embedding_A:
            continue
        why = None
        if type(mod) is not LoraLinear:
            why = f"{type(mod).__module__}.{type(mod).__qualname__} (only lora.Linear)"
        elif adapter_name in mod.lora_magnitude_vector:
            why = "DoRA"
        elif adapter_name in mod.lora_variant:
            why = f"LoRA variant {type(mod.lora_variant[adapter_name]).__name__}"
        elif adapter_name in mod.merged_adapters:
            why = "adapter is merged into the base weight (unmerge first)"
        if why:
            problems.append(f"{name}: {why}")
        else:
            layers[name] = mod
    if problems:
        raise UnsupportedVariantError(
            f"{len(problems)} LoRA layer(s) cannot be annealed: {'; '.join(problems[:5])}"
            + (" ..." if len(problems) > 5 else ""), key=problems[0].split(":")[0])
    if not layers:
        raise OptionError(f"no LoRA layers hold adapter {adapter_name!r}", key="adapter_name")
    return layers


@dataclass
class _Spectrum:
    """The exact SVD of one layer's ``c * B @ A`` as maps on its factors."""

    left: torch.Tensor  # (r, r): U = B @ left
    S: torch.Tensor  # (r,) descending, float64
    right: torch.Tensor  # (r, r): Vh = right @ A
    scale: float


def _spectrum(layer: nn.Module, adapter: str) -> _Spectrum:
    a = layer.lora_A[adapter].weight.detach().double()  # (r, in)
    b = layer.lora_B[adapter].weight.detach().double()  # (out, r)
    c = float(layer.scaling[adapter])
    core = factored_core(b[None], a[None], torch.tensor([c], dtype=torch.float64))
    return _Spectrum(core.left[0], core.S[0], core.right[0], c)


def _ranks(layers: dict[str, nn.Module], spectra: dict[str, _Spectrum],
           rank: int | RankPolicy, adapter: str) -> dict[str, int]:
    """The rank each layer keeps (never more than it has)."""
    cur = {n: int(layer.r[adapter]) for n, layer in layers.items()}
    if isinstance(rank, RankPolicy):
        if rank.is_budget:
            costs = {n: int(lay.in_features) + int(lay.out_features) for n, lay in layers.items()}
            total = sum(cur[n] * costs[n] for n in layers)
            got = allocate_budget({n: s.S for n, s in spectra.items()}, costs,
                                  rank.budget_params(total))
        else:
            got = {n: select_rank(s.S, rank) for n, s in spectra.items()}
    else:
        if int(rank) != rank or rank < 1:
            raise OptionError(f"rank must be an integer >= 1, got {rank}", key="rank")
        got = dict.fromkeys(layers, int(rank))
    return {n: max(1, min(got[n], cur[n])) for n in layers}


@dataclass
class _Plan:
    """New factors for one layer and the gradient maps the optimizer state goes through."""

    rank: int
    down: torch.Tensor  # (k, in) float64
    up: torch.Tensor  # (out, k) float64
    alpha: float
    scale: float
    grad_up: torch.Tensor  # (r, k): g_B' = g_B @ grad_up
    grad_down: torch.Tensor  # (k, r): g_A' = grad_down @ g_A


def _plan(layer: nn.Module, adapter: str, spec: _Spectrum, k: int, rule: ScaleRule,
          gen: torch.Generator) -> _Plan:
    rslora = bool(layer.use_rslora.get(adapter, False))
    root_k = math.sqrt(k) if rslora else float(k)
    c = spec.scale
    if rule is ScaleRule.KEEP_SCALE:
        c_new, alpha = c, c * root_k
    else:
        alpha = float(layer.lora_alpha[adapter])
        c_new = alpha / root_k
    if not (c > 0 and c_new > 0):
        raise OptionError(f"LoRA scaling must be > 0 to split the update, got {c}",
                          key="scaling")
    a = layer.lora_A[adapter].weight.detach().double()  # (r, in)
    b = layer.lora_B[adapter].weight.detach().double()  # (out, r)
    root = (spec.S[:k] / c_new).sqrt()  # (k,)
    m_b = spec.left[:, :k] * root  # (r, k): B' = B @ m_b
    m_a = root[:, None] * spec.right[:k]  # (k, r): A' = m_a @ A
    up, down = b @ m_b, m_a @ a  # (out, k), (k, in)
    dead = spec.S[:k] <= 0  # (k,) null directions: fresh LoRA pairs (B column is already 0)
    if bool(dead.any()):
        bound = 1.0 / math.sqrt(a.shape[1])
        fresh = torch.rand(int(dead.sum()), a.shape[1], generator=gen, dtype=torch.float64)
        down[dead] = ((2 * fresh - 1) * bound).to(down.device)
    ratio = c_new / c
    return _Plan(k, down, up, alpha, c_new, ratio * m_a.T, ratio * m_b.T)


def _inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer behind wrappers such as accelerate's ``AcceleratedOptimizer``."""
    inner = optimizer
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise OptionError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}",
                          key="optimizer")
    return inner


def _check_projectable(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    bad = set()
    for p in params:
        for key, v in opt.state.get(p, {}).items():
            if torch.is_tensor(v) and v.shape == p.shape and \
                    key not in FIRST_MOMENTS | SECOND_MOMENTS:
                bad.add(key)
    if bad:
        raise OptionError(f"optimizer state {sorted(bad)} of {type(opt).__name__} cannot be "
                          "projected onto the new factors", key="optimizer_state",
                          hint="use optimizer_state='reset'")


def _swap(opt: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter,
          mode: OptimizerState, first: Callable[[torch.Tensor], torch.Tensor],
          second: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Point ``opt`` at ``new`` where it held ``old``; drop or project ``old``'s state."""
    for group in opt.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = opt.state.pop(old, None)
    if mode is OptimizerState.RESET or not state:
        return
    moved: dict[str, Any] = {}
    for key, v in state.items():
        if torch.is_tensor(v) and v.shape == old.shape:
            f = first if key in FIRST_MOMENTS else second
            out = f(v.double())
            moved[key] = (out if key in FIRST_MOMENTS else out.clamp_min(0)).to(v.dtype)
        else:
            moved[key] = v  # step counters and other scalars
    opt.state[new] = moved


def _install(layer: nn.Module, adapter: str, plan: _Plan, opt: torch.optim.Optimizer | None,
             mode: OptimizerState) -> None:
    lin_a, lin_b = layer.lora_A[adapter], layer.lora_B[adapter]
    old_a, old_b = lin_a.weight, lin_b.weight
    new_a = nn.Parameter(plan.down.to(device=old_a.device, dtype=old_a.dtype).contiguous(),
                         requires_grad=old_a.requires_grad)
    new_b = nn.Parameter(plan.up.to(device=old_b.device, dtype=old_b.dtype).contiguous(),
                         requires_grad=old_b.requires_grad)
    lin_a.weight, lin_a.out_features = new_a, plan.rank
    lin_b.weight, lin_b.in_features = new_b, plan.rank
    layer.r[adapter] = plan.rank
    layer.lora_alpha[adapter] = plan.alpha
    layer.scaling[adapter] = plan.scale
    if opt is None:
        return
    gu, gd = plan.grad_up, plan.grad_down  # (r, k), (k, r)
    _swap(opt, old_a, new_a, mode,
          lambda v: gd.to(v.device) @ v, lambda v: gd.to(v.device).square() @ v)
    _swap(opt, old_b, new_b, mode,
          lambda v: v @ gu.to(v.device), lambda v: v @ gu.to(v.device).square())


def _update_config(config: Any, layers: dict[str, nn.Module], adapter: str) -> None:
    """``r`` / ``lora_alpha`` = the most common values, exact-path patterns for the rest."""
    from lorakit.formats.common import common_value, exact_patterns, number

    ranks = {n: int(layer.r[adapter]) for n, layer in layers.items()}
    alphas = {n: number(float(layer.lora_alpha[adapter])) for n, layer in layers.items()}
    r0 = common_value(list(ranks.values()))
    a0 = common_value(list(alphas.values()))
    config.r = int(r0)
    config.lora_alpha = a0
    config.rank_pattern = exact_patterns(ranks, r0)
    config.alpha_pattern = exact_patterns(alphas, a0)


def shrink_peft_model(model: nn.Module, rank: int | RankPolicy, adapter_name: str = "default",
                      optimizer: Any = None,
                      optimizer_state: OptimizerState | str = OptimizerState.RESET, *,
                      scale_rule: ScaleRule | str = ScaleRule.KEEP_SCALE,
                      seed: int = 0) -> ShrinkReport:
    """Shrink every LoRA layer of ``adapter_name`` in place to ``rank`` (or the rank a
    :class:`~lorakit.lowrank.RankPolicy` picks per layer; a budget spreads over the layers) by the
    exact SVD of its update. Layers already at or below the rank are left untouched. Mutates
    ``model``, its PEFT config and ``optimizer`` (see the module docstring); everything is checked
    before anything changes.

    Example:
        >>> report = shrink_peft_model(peft_model, 4, optimizer=opt,
        ...                            optimizer_state="project")        # doctest: +SKIP
        >>> set(report.ranks().values())                                 # doctest: +SKIP
        {4}
    """
    mode, rule = OptimizerState(optimizer_state), ScaleRule(scale_rule)
    layers = lora_layers(model, adapter_name)
    _, config = _peft_root(model, adapter_name)
    opt = None if optimizer is None else _inner_optimizer(optimizer)
    with torch.no_grad():
        spectra = {n: _spectrum(layer, adapter_name) for n, layer in layers.items()}
        ranks = _ranks(layers, spectra, rank, adapter_name)
        changed = [n for n in layers if ranks[n] < int(layers[n].r[adapter_name])]
        if opt is not None and mode is OptimizerState.PROJECT:
            _check_projectable(opt, [p for n in changed for p in (
                layers[n].lora_A[adapter_name].weight, layers[n].lora_B[adapter_name].weight)])
        gen = torch.Generator().manual_seed(seed)
        plans = {n: _plan(layers[n], adapter_name, spectra[n], ranks[n], rule, gen)
                 for n in changed}
        report = ShrinkReport(optimizer_state=None if opt is None else mode.value)
        for name, layer in layers.items():
            before = int(layer.r[adapter_name])
            if name in plans:
                _install(layer, adapter_name, plans[name], opt, mode)
            e = spectra[name].S.pow(2)
            total, dropped = float(e.sum()), float(e[ranks[name]:].sum())
            report.layers.append(LayerCut(
                name, before, ranks[name], 1.0 - dropped / total if total > 0 else 1.0,
                math.sqrt(dropped / total) if total > 0 else 0.0))
    if config is not None:
        _update_config(config, layers, adapter_name)
    return report


# ----------------------------------------------------------------------------- annealer


@dataclass
class CutRecord:
    """One cut the annealer made: the global step it ran at, the rank and the layer report."""

    step: int
    rank: int
    report: ShrinkReport


class RankAnnealer:
    """Drives a schedule of cuts from a training loop (``step``) or a transformers Trainer
    (:meth:`trainer_callback`). When several cuts are due at once, only the last (smallest)
    rank is applied: one exact truncation equals the chain of them.

    Example:
        >>> annealer = RankAnnealer([(10, 4), (20, 2)], optimizer_state="reset")
        >>> annealer.due(9), annealer.due(25)
        (None, 2)
    """

    def __init__(self, schedule: Sequence[tuple[int, int]], *, adapter_name: str = "default",
                 optimizer_state: OptimizerState | str = OptimizerState.RESET,
                 scale_rule: ScaleRule | str = ScaleRule.KEEP_SCALE, seed: int = 0) -> None:
        self.schedule = check_schedule(schedule)
        self.adapter_name = adapter_name
        self.optimizer_state = OptimizerState(optimizer_state)
        self.scale_rule = ScaleRule(scale_rule)
        self.seed = seed
        self.history: list[CutRecord] = []
        self._next = 0

    @property
    def final_rank(self) -> int:
        return self.schedule[-1][1]

    @property
    def done(self) -> bool:
        return self._next >= len(self.schedule)

    def due(self, global_step: int) -> int | None:
        """The rank to cut to once ``global_step`` optimizer steps are done (None: no cut)."""
        ready = [r for s, r in self.schedule[self._next:] if s <= global_step]
        return ready[-1] if ready else None

    def step(self, global_step: int, model: nn.Module, optimizer: Any = None
             ) -> ShrinkReport | None:
        """Apply the cuts due at ``global_step`` (call after ``optimizer.step()``)."""
        rank = self.due(global_step)
        if rank is None:
            return None
        self._next += sum(1 for s, _ in self.schedule[self._next:] if s <= global_step)
        report = shrink_peft_model(model, rank, self.adapter_name, optimizer,
                                   self.optimizer_state, scale_rule=self.scale_rule,
                                   seed=self.seed + len(self.history))
        self.history.append(CutRecord(int(global_step), rank, report))
        return report

    def trainer_callback(self) -> Any:
        """A ``transformers.TrainerCallback`` that calls :meth:`step` at every step end."""
        return rank_annealing_callback_class()(self)


@functools.cache
def rank_annealing_callback_class() -> type:
    """The ``TrainerCallback`` subclass (built on first use, so this module imports without
    transformers).

    Example:
        >>> cb = rank_annealing_callback_class()(annealer)     # doctest: +SKIP
        >>> trainer.add_callback(cb)                           # doctest: +SKIP
    """
    try:
        from transformers import TrainerCallback
    except ImportError as e:  # pragma: no cover - the transfer extra is installed in CI
        raise MissingDependencyError("the Trainer callback needs transformers",
                                     hint="pip install 'lorakit[transfer]'") from e

    class RankAnnealingCallback(TrainerCallback):
        """Cuts LoRA ranks on the annealer's schedule at the end of each optimizer step."""

        def __init__(self, annealer: RankAnnealer) -> None:
            self.annealer = annealer

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            if model is None:
                raise OptionError("the Trainer passed no model to the callback", key="model")
            self.annealer.step(state.global_step, model, optimizer)

    return RankAnnealingCallback


def __getattr__(name: str) -> Any:
    if name == "RankAnnealingCallback":
        return rank_annealing_callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
