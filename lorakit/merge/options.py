"""Typed options for the merge methods and the context every method receives.

One frozen dataclass per method, shared by the API, the CLI and YAML recipes; closed sets are enums.

Example:
    >>> TiesOptions(density=0.3).sign
    <SignMethod.TOTAL: 'total'>
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lorakit.merge.align import Space

if TYPE_CHECKING:
    from lorakit.lowrank import RankPolicy


class SignMethod(str, enum.Enum):
    """TIES sign election: by the sign of the summed values or by the majority count."""

    TOTAL = "total"
    FREQUENCY = "frequency"


class DisjointMerge(str, enum.Enum):
    """How agreeing entries combine after sign election."""

    MEAN = "mean"
    SUM = "sum"


class TrimScope(str, enum.Enum):
    """Magnitude trimming per tensor (each task's module) or over all modules of a task."""

    TENSOR = "tensor"
    GLOBAL = "global"


@dataclass(frozen=True)
class CatOptions:
    """``cat`` has no knobs: it is exact."""


@dataclass(frozen=True)
class LinearOptions:
    """``linear`` / ``task_arithmetic``: weighted sum; an optional rank policy truncates it."""


@dataclass(frozen=True)
class SvdOptions:
    """``svd``: the exact sum truncated by the rank policy (default: the largest input rank)."""


@dataclass(frozen=True)
class FactorLinearOptions:
    """``factor_linear``: weighted sums of A and of B separately (inexact; legacy)."""


@dataclass
class MergeContext:
    """What every method gets besides its options: policy, device, dtype, seed, progress."""

    policy: RankPolicy | None = None
    device: str = "auto"
    dtype: torch.dtype | None = None  # output dtype; None keeps the first input's
    seed: int = 0
    progress: Callable[[str], None] | None = None
    notes: dict = field(default_factory=dict)
    weights: Sequence[float] = ()  # every input adapter's weight (calibrated methods)
    grams: Sequence = ()  # one lorakit.calibrate.GramSet per input adapter (calibrated methods)

    def tick(self, key: str) -> None:
        if self.progress is not None:
            self.progress(key)

    def out_dtype(self, terms: Sequence) -> torch.dtype:
        return self.dtype or terms[0].module.dtype


def _enum(cls, value):
    return value if isinstance(value, cls) else cls(value)


@dataclass(frozen=True)
class TiesOptions:
    """TIES: trim to ``density`` by magnitude, elect signs, disjoint mean, scale by ``lam``.

    ``density`` defaults to 0.1 (the paper's 0.2 scored lower on the zoo's quality benchmark; see
    :mod:`lorakit.merge.ties` for the figures).
    """

    density: float = 0.1
    sign: SignMethod = SignMethod.TOTAL
    disjoint: DisjointMerge = DisjointMerge.MEAN
    scope: TrimScope = TrimScope.TENSOR
    lam: float = 1.0
    space: Space = Space.FULL

    def __post_init__(self) -> None:
        object.__setattr__(self, "sign", _enum(SignMethod, self.sign))
        object.__setattr__(self, "disjoint", _enum(DisjointMerge, self.disjoint))
        object.__setattr__(self, "scope", _enum(TrimScope, self.scope))
        object.__setattr__(self, "space", _enum(Space, self.space))
        _check_density(self.density)


@dataclass(frozen=True)
class DareOptions:
    """DARE (``dare_linear``): drop with probability ``1 - density``, rescale, weighted sum."""

    density: float = 0.5
    rescale: bool = True
    lam: float = 1.0
    space: Space = Space.FULL

    def __post_init__(self) -> None:
        object.__setattr__(self, "space", _enum(Space, self.space))
        _check_density(self.density)


@dataclass(frozen=True)
class DareTiesOptions:
    """DARE + TIES sign election and disjoint merge (``dare_ties``)."""

    density: float = 0.5
    rescale: bool = True
    sign: SignMethod = SignMethod.TOTAL
    disjoint: DisjointMerge = DisjointMerge.MEAN
    lam: float = 1.0
    space: Space = Space.FULL

    def __post_init__(self) -> None:
        object.__setattr__(self, "sign", _enum(SignMethod, self.sign))
        object.__setattr__(self, "disjoint", _enum(DisjointMerge, self.disjoint))
        object.__setattr__(self, "space", _enum(Space, self.space))
        _check_density(self.density)


@dataclass(frozen=True)
class MagnitudePruneOptions:
    """Magnitude pruning: trim each task to ``density`` by magnitude, then the weighted sum."""

    density: float = 0.5
    scope: TrimScope = TrimScope.TENSOR
    lam: float = 1.0
    space: Space = Space.FULL

    def __post_init__(self) -> None:
        object.__setattr__(self, "scope", _enum(TrimScope, self.scope))
        object.__setattr__(self, "space", _enum(Space, self.space))
        _check_density(self.density)


def _check_density(d: float) -> None:
    from lorakit.errors import OptionError

    if not 0.0 < float(d) <= 1.0:
        raise OptionError(f"density must be in (0, 1], got {d}", key="density")


class OutputReweight(str, enum.Enum):
    """LoRA-LEGO output reweighting of the merged update (variance correction).

    ``none``: the sum of the ``k`` centroid units. ``sqrt_ratio``: the merged update times
    ``sqrt(N / k)`` for ``N`` pooled units, which restores the output variance of ``N``
    independent units summed (the paper's variance-expansion argument). ``cluster_size``: each
    centroid times its member count, so similar units add up as they would in ``cat``.
    """

    NONE = "none"
    SQRT_RATIO = "sqrt_ratio"
    CLUSTER_SIZE = "cluster_size"


@dataclass(frozen=True)
class LegoOptions:
    """LoRA-LEGO: ``k`` clusters of rank-one units per module (default: largest input rank).

    ``param_reweight`` rescales each centroid unit so its norm ``|a||b|`` equals its members'
    mean norm (averaging shrinks norms); ``output_reweight`` corrects the variance lost when many
    units collapse into ``k`` (see :class:`OutputReweight`). The defaults (``k`` = largest input
    rank, ``param_reweight`` on, ``output_reweight`` none) scored best on the zoo's quality
    benchmark; see :mod:`lorakit.merge.lego` for the figures.
    """

    k: int | None = None
    param_reweight: bool = True
    output_reweight: OutputReweight = OutputReweight.NONE
    n_init: int = 10
    max_iter: int = 300

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_reweight", _enum(OutputReweight, self.output_reweight))
        if self.k is not None and int(self.k) < 1:
            from lorakit.errors import OptionError

            raise OptionError(f"k must be >= 1, got {self.k}", key="k")


class KnotsMerge(str, enum.Enum):
    """How KnOTS combines the tasks' aligned coefficients."""

    TIES = "ties"
    DARE_TIES = "dare_ties"
    SUM = "sum"
    MEAN = "mean"


@dataclass(frozen=True)
class KnotsOptions:
    """KnOTS: joint SVD alignment, then TIES/DARE on the aligned per-task coefficients.

    ``density`` is the top-K fraction kept per task over all layers (TIES) or the DARE keep
    probability; ``lam`` scales the merged update. ``merge=sum`` with ``density=1`` equals
    ``linear`` when ``lam=1``. The default ``lam=0.3`` scored best on the zoo's quality benchmark
    (six tasks; see :mod:`lorakit.merge.knots`); pass ``lam=1`` for the unscaled merge.
    """

    merge: KnotsMerge = KnotsMerge.TIES
    density: float = 0.2
    sign: SignMethod = SignMethod.TOTAL
    disjoint: DisjointMerge = DisjointMerge.MEAN
    lam: float = 0.3

    def __post_init__(self) -> None:
        object.__setattr__(self, "merge", _enum(KnotsMerge, self.merge))
        object.__setattr__(self, "sign", _enum(SignMethod, self.sign))
        object.__setattr__(self, "disjoint", _enum(DisjointMerge, self.disjoint))
        _check_density(self.density)


class MissingModule(str, enum.Enum):
    """RegMean for a module only some adapters have.

    ``zero``: the others take part with ``D_j = 0`` and their Gram (they ask for the base
    layer's output on their prompts), as a merge of full models would. ``skip``: the module is
    solved over the adapters that have it only (so one adapter's module is kept as is).
    """

    ZERO = "zero"
    SKIP = "skip"


class GramScale(str, enum.Enum):
    """Each task's Gram as captured (``sum`` over its tokens) or per token (``mean``), so tasks
    with long prompts do not outweigh tasks with short ones."""

    SUM = "sum"
    MEAN = "mean"


@dataclass(frozen=True)
class RegmeanOptions:
    """RegMean: per-layer least squares on calibration activations (see
    :mod:`lorakit.merge.regmean`).

    ``shrink`` (``a``): off-diagonal Gram entries are multiplied by ``a`` (``G <- a G +
    (1 - a) diag(G)``); 1 (the default, best on the zoo's quality benchmark, see
    :mod:`lorakit.merge.regmean`) is plain RegMean, 0 the per-feature diagonal solution. Capture:
    ``activations`` (base or own), at most ``max_prompts`` prompts per adapter, each cut to
    ``max_tokens`` tokens, ``batch_size`` prompts per forward, ``memory_gb`` of Grams resident
    per capture pass. ``missing`` and ``gram_scale``: see :class:`MissingModule`,
    :class:`GramScale`.
    """

    shrink: float = 1.0
    activations: str = "base"
    missing: MissingModule = MissingModule.ZERO
    gram_scale: GramScale = GramScale.SUM
    max_prompts: int = 64
    max_tokens: int = 256
    batch_size: int = 8
    memory_gb: float = 4.0

    def __post_init__(self) -> None:
        from lorakit.calibrate.grams import Activations
        from lorakit.errors import OptionError

        try:
            object.__setattr__(self, "activations", _enum(Activations, self.activations))
            object.__setattr__(self, "missing", _enum(MissingModule, self.missing))
            object.__setattr__(self, "gram_scale", _enum(GramScale, self.gram_scale))
        except ValueError as e:
            raise OptionError(str(e)) from None
        if not 0.0 <= float(self.shrink) <= 1.0:
            raise OptionError(f"shrink must be in [0, 1], got {self.shrink}", key="shrink")
        for name in ("max_prompts", "max_tokens", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise OptionError(f"{name} must be an integer >= 1, got {v!r}", key=name)
        if not float(self.memory_gb) > 0:
            raise OptionError(f"memory_gb must be > 0, got {self.memory_gb}", key="memory_gb")

    def capture(self):
        """The capture settings (:class:`lorakit.calibrate.CaptureConfig`)."""
        from lorakit.calibrate.grams import CaptureConfig

        return CaptureConfig(self.activations, self.max_tokens, self.batch_size,
                             float(self.memory_gb))


class Consensus(str, enum.Enum):
    """Sign consensus for Breadcrumbs / DELLA: none (plain sum) or TIES's election."""

    NONE = "none"
    TOTAL = "total"
    FREQUENCY = "frequency"


@dataclass(frozen=True)
class BreadcrumbsOptions:
    """Model Breadcrumbs: per task, drop the top ``gamma`` fraction by magnitude (outliers) and
    keep the next ``density`` fraction; then the sum (or TIES consensus) times ``lam`` (default
    0.3 from the zoo's quality benchmark; the paper sums at 1, see
    :mod:`lorakit.merge.breadcrumbs`)."""

    density: float = 0.1
    gamma: float = 0.01
    consensus: Consensus = Consensus.NONE
    disjoint: DisjointMerge = DisjointMerge.MEAN
    scope: TrimScope = TrimScope.TENSOR
    lam: float = 0.3
    space: Space = Space.FULL

    def __post_init__(self) -> None:
        from lorakit.errors import OptionError

        for name, cls in (("consensus", Consensus), ("disjoint", DisjointMerge),
                          ("scope", TrimScope), ("space", Space)):
            object.__setattr__(self, name, _enum(cls, getattr(self, name)))
        _check_density(self.density)
        if not 0.0 <= float(self.gamma) < 1.0 or float(self.gamma) + float(self.density) > 1.0:
            raise OptionError(f"gamma must be in [0, 1 - density], got {self.gamma}",
                              key="gamma")


@dataclass(frozen=True)
class DellaOptions:
    """DELLA: per row, magnitude-ranked keep probabilities ``density +- epsilon/2`` with
    ``1/p`` rescaling (MagPrune), then TIES sign election and the disjoint mean, times ``lam``
    (default 0.5 from the zoo's quality benchmark, see :mod:`lorakit.merge.della`)."""

    density: float = 0.5
    epsilon: float = 0.1
    rescale: bool = True
    consensus: Consensus = Consensus.TOTAL
    disjoint: DisjointMerge = DisjointMerge.MEAN
    lam: float = 0.5
    space: Space = Space.FULL

    def __post_init__(self) -> None:
        from lorakit.errors import OptionError

        for name, cls in (("consensus", Consensus), ("disjoint", DisjointMerge),
                          ("space", Space)):
            object.__setattr__(self, name, _enum(cls, getattr(self, name)))
        _check_density(self.density)
        d, e = float(self.density), float(self.epsilon)
        if e < 0 or d - e / 2 <= 0 or d + e / 2 > 1:
            raise OptionError(f"epsilon must keep density +- epsilon/2 inside (0, 1], got "
                              f"epsilon {self.epsilon} with density {self.density}",
                              key="epsilon")


@dataclass(frozen=True)
class TsvOptions:
    """TSV-Merge: each task keeps its top ``sv_reduction`` share of ``min(out, in)`` singular
    triplets (default ``1 / T``); the stacked singular vectors are orthogonalised (Procrustes)
    and the sum is scaled by ``alpha`` (default 0.3, best on the zoo's quality benchmark; the
    paper's 1.0 sums six full-strength updates, see :mod:`lorakit.merge.tsv`)."""

    sv_reduction: float | None = None
    alpha: float = 0.3

    def __post_init__(self) -> None:
        if self.sv_reduction is not None:
            _check_fraction("sv_reduction", self.sv_reduction)


@dataclass(frozen=True)
class IsoCOptions:
    """Iso-C: the task sum with its spectrum flattened to the mean singular value, times
    ``alpha`` (default 1.5, best on the zoo's quality benchmark, see :mod:`lorakit.merge.iso_c`)."""

    alpha: float = 1.5


@dataclass(frozen=True)
class IsoCtsOptions:
    """Iso-CTS: the top ``common_fraction`` of the core dimension from the task sum, the rest
    shared out to task-specific directions; orthogonalised, flattened, times ``alpha`` (default
    1.5 from the zoo's quality benchmark, see :mod:`lorakit.merge.iso_cts`)."""

    common_fraction: float = 0.8
    alpha: float = 1.5

    def __post_init__(self) -> None:
        _check_fraction("common_fraction", self.common_fraction)


@dataclass(frozen=True)
class CartOptions:
    """CART: the task mean plus ``lam`` times each task's centred residual cut to rank
    ``ceil(rank_fraction * R)`` (``R``: the core dimension); ``lam`` defaults to 1.5 from the
    zoo's quality benchmark (see :mod:`lorakit.merge.cart`)."""

    rank_fraction: float = 0.1
    lam: float = 1.5

    def __post_init__(self) -> None:
        _check_fraction("rank_fraction", self.rank_fraction)


def _check_fraction(name: str, v: float) -> None:
    from lorakit.errors import OptionError

    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) <= 1.0:
        raise OptionError(f"{name} must be in (0, 1], got {v!r}", key=name)
