"""The in-memory adapter model every format loads into and writes from.

Conventions (resolved once, here):

* ``LoraModule.down`` is A and ``LoraModule.up`` is B, always in PEFT's "standard" layout, whatever the
  file: linear ``down (r, in)``, ``up (out, r)``; conv ``down (r, in, kh, kw)``, ``up (out, r, 1, 1)``;
  embedding ``down (r, num_embeddings)``, ``up (embedding_dim, r)``. GPT-2 ``Conv1D`` layers
  (``fan_in_fan_out``) store their factors in this layout too; the flag only says how the base weight
  is laid out and is kept in the adapter config.
* ``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), ``r = down.shape[0]``. A kohya file
  without an ``.alpha`` tensor means ``alpha = r``.
* The update is ``delta = scale * B @ A`` (conv: over the flattened kernel; embedding: this is the
  transpose of the embedding-weight update, ``(dim, num_embeddings)``).
* Module keys carry no format prefix: PEFT ``base_model.model.X.lora_A.weight`` is key ``X``.
  Diffusion formats keep the pipeline component as the first segment (``unet.``, ``text_encoder.``,
  ``text_encoder_2.``, ``transformer.``) so several components can share one adapter.

Example:
    >>> import torch
    >>> from lorakit.adapter import Adapter, LoraModule
    >>> m = LoraModule(down=torch.ones(2, 3), up=torch.ones(4, 2), alpha=4.0)
    >>> m.rank, m.scale, tuple(m.delta().shape)
    (2, 2.0, (4, 3))
    >>> Adapter(modules={"layer.q": m}).num_params()
    14
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lorakit.errors import NonFiniteError, ShapeMismatchError

FINITE_SPAN = 1 << 22  # tensor entries per NaN/Inf scanning job


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` holds no NaN/Inf: one sum (NaN and Inf propagate; half types accumulate in
    float32 inside the kernel, twice as fast as asking for a float32 result), with an exact mask
    check only when that sum is not finite (it may overflow on huge finite values)."""
    if t.numel() == 0:
        return True
    if math.isfinite(float(t.sum())):
        return True
    flat = t.reshape(-1)
    step = 1 << 24  # the exact mask in pieces: a whole file's run would need its size in bools
    return all(bool(torch.isfinite(flat[i:i + step]).all()) for i in range(0, flat.numel(), step))


class ModuleKind(str, enum.Enum):
    """What kind of base layer a LoRA module adapts."""

    LINEAR = "linear"
    CONV = "conv"
    EMBEDDING = "embedding"


class DoraAxis(str, enum.Enum):
    """Which norm a DoRA magnitude vector replaces, in lorakit's delta orientation ``(out, in)``:
    one value per output row (PEFT ``lora_magnitude_vector`` of linear and conv layers, LyCORIS
    ``dora_scale`` with ``wd_on_out=True``, shape ``(out, 1)``) or per input column (LyCORIS
    ``wd_on_out=False``, shape ``(1, in)``; PEFT's embedding magnitude, one per embedding row)."""

    OUT = "out"
    IN = "in"


@dataclass
class LoraModule:
    """One LoRA pair with its scale conventions.

    Fields:
        down: A, ``(r, in)`` / conv ``(r, in, kh, kw)`` / embedding ``(r, num_embeddings)``.
        up: B, ``(out, r)`` / conv ``(out, r, 1, 1)`` / embedding ``(dim, r)``.
        alpha: the LoRA alpha; ``scale`` derives from it.
        rslora: scale is ``alpha / sqrt(r)`` instead of ``alpha / r``.
        magnitude: DoRA magnitude vector (stored as in the file), or None.
        bias: the ``lora_B`` bias (PEFT ``lora_bias=True``), ``(out,)``, or None.
        kind: linear, conv or embedding.
        magnitude_axis: which norm ``magnitude`` replaces (:class:`DoraAxis`).
        origin: the LyCORIS type the factors are the exact LoRA form of (``"loha"``, ``"lokr"``,
            ``"locon-tucker"``, ``"diff"``), None for a LoRA read as such.
        file_dtype: the dtype of the file's own tensors when the exact form is kept in a wider
            one (products of fp16 factors are exact in float32); outputs default to it.

    Example:
        >>> import torch
        >>> LoraModule(torch.zeros(4, 8), torch.zeros(16, 4), alpha=8, rslora=True).scale
        4.0
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    rslora: bool = False
    magnitude: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    kind: ModuleKind = ModuleKind.LINEAR
    magnitude_axis: DoraAxis = DoraAxis.OUT
    origin: str | None = None
    file_dtype: torch.dtype | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        r = self.rank
        if r == 0:
            return 0.0
        return float(self.alpha) / (math.sqrt(r) if self.rslora else r)

    @property
    def in_features(self) -> int:
        return int(self.down.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def kernel(self) -> tuple[int, ...]:
        """Conv kernel size of A (``()`` for linear and embedding)."""
        return tuple(int(s) for s in self.down.shape[2:])

    @property
    def delta_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features, *self.kernel)

    @property
    def dtype(self) -> torch.dtype:
        """The module's own dtype: the file's (``file_dtype``) for an exact LyCORIS form."""
        return self.file_dtype or self.down.dtype

    def num_params(self) -> int:
        n = self.down.numel() + self.up.numel()
        if self.magnitude is not None:
            n += self.magnitude.numel()
        if self.bias is not None:
            n += self.bias.numel()
        return n

    def down_matrix(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A flattened to a matrix ``(r, in * kh * kw)``."""
        a = self.down.reshape(self.rank, -1)
        return a if dtype is None else a.to(dtype)

    def up_matrix(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """B flattened to a matrix ``(out, r)``."""
        b = self.up.reshape(self.up.shape[0], self.rank)
        return b if dtype is None else b.to(dtype)

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Materialise ``scale * B @ A`` in ``delta_shape``. For tests and small layers only."""
        b = self.up_matrix(dtype)  # (out, r)
        a = self.down_matrix(dtype)  # (r, in * k)
        return (self.scale * (b @ a)).reshape(self.delta_shape)

    def with_factors(self, down: torch.Tensor, up: torch.Tensor, alpha: float | None = None,
                     **changes: Any) -> LoraModule:
        """A copy with new factors (and optionally alpha), other fields kept."""
        return replace(self, down=down, up=up, alpha=self.alpha if alpha is None else alpha,
                       **changes)

    def validate(self, key: str, path: str | None = None, *, finite: bool = True) -> None:
        """Raise a named error if the factors cannot form an update or hold NaN/Inf
        (``finite=False`` leaves the NaN/Inf scan to the caller: :func:`check_finite`)."""
        a, b = self.down, self.up
        if a.ndim < 2 or b.ndim < 2:
            raise ShapeMismatchError(
                f"LoRA factors must be at least 2-D, got A {tuple(a.shape)} and B {tuple(b.shape)}",
                path=path, key=key)
        if self.kind is ModuleKind.CONV:
            if a.ndim != 4 or b.ndim != 4 or tuple(b.shape[2:]) != (1, 1):
                raise ShapeMismatchError(
                    f"conv LoRA needs A (r, in, kh, kw) and B (out, r, 1, 1), got A {tuple(a.shape)}"
                    f" and B {tuple(b.shape)}", path=path, key=key)
        elif a.ndim != 2 or b.ndim != 2:
            raise ShapeMismatchError(
                f"linear LoRA needs 2-D factors, got A {tuple(a.shape)} and B {tuple(b.shape)}",
                path=path, key=key)
        if a.shape[0] != b.shape[1]:
            raise ShapeMismatchError(
                f"rank mismatch: A is {tuple(a.shape)} (rank {a.shape[0]}) but B is {tuple(b.shape)}"
                f" (rank {b.shape[1]})", path=path, key=key)
        if a.shape[0] == 0:
            raise ShapeMismatchError("rank 0 factors", path=path, key=key)
        if self.bias is not None and tuple(self.bias.shape) != (b.shape[0],):
            raise ShapeMismatchError(
                f"lora_B bias has shape {tuple(self.bias.shape)}, expected ({b.shape[0]},)",
                path=path, key=key)
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)):
            raise NonFiniteError(f"alpha is {self.alpha!r}", path=path, key=key)
        from lorakit.values import check_scale

        why = check_scale(float(self.alpha), self.rank, self.rslora)
        if why:
            raise NonFiniteError(why, path=path, key=key)
        if finite:
            check_finite({key: self}, path)

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """The module's floating-point tensors with their file names (``lora_A``, ...)."""
        return [(n, t) for n, t in (("lora_A", self.down), ("lora_B", self.up),
                                    ("magnitude", self.magnitude), ("bias", self.bias))
                if t is not None and t.is_floating_point()]


def check_finite(modules: dict[str, LoraModule], path: str | None = None) -> None:
    """Raise :class:`NonFiniteError` naming the first module (in order) and tensor that holds
    NaN or Inf. Runs of at least ``FINITE_SPAN`` entries are scanned by one multi-threaded
    kernel each; smaller ones are grouped into jobs of about that size that run side by side on
    CPU threads (:mod:`lorakit.lowrank.threads`).

    Tensors that lie back to back in one storage (every tensor of a file read by
    :func:`lorakit.io.read_safetensors`) are scanned as one flat run, one multi-threaded pass per
    file instead of a call per tensor (3x faster on the 343 MiB inputs of bench/merge_llm.py).
    Only when a run holds a bad value are its tensors rescanned one by one, in order, to name it.

    Example:
        >>> m = LoraModule(torch.ones(2, 3), torch.full((4, 2), float("nan")), alpha=2)
        >>> check_finite({"q": m}, "a.safetensors")
        Traceback (most recent call last):
        ...
        lorakit.errors.NonFiniteError: a.safetensors: key 'q': lora_B holds NaN or Inf values
    """
    from lorakit.lowrank.threads import parallel_map

    named = [(key, name, t) for key, m in modules.items() for name, t in m.named_tensors()]
    runs = _flat_runs([t for _, _, t in named])
    jobs: list[list[torch.Tensor]] = [[]]  # small runs, about FINITE_SPAN entries per job
    size = 0
    for run in runs:
        if run.numel() >= FINITE_SPAN:
            continue
        if size + run.numel() > FINITE_SPAN and jobs[-1]:
            jobs.append([])
            size = 0
        jobs[-1].append(run)
        size += run.numel()
    devices = {t.device.type for _, _, t in named}
    device = "cpu" if devices <= {"cpu"} else "cuda"
    # large runs: one multi-threaded kernel each; small ones: single-threaded jobs side by side
    # (a kernel per small tensor would pay the intra-op threads' wake-up every time)
    if (all(all_finite(run) for run in runs if run.numel() >= FINITE_SPAN)
            and all(parallel_map(lambda job: all(all_finite(t) for t in job), jobs,
                                 device=device))):
        return
    for key, name, t in named:
        if not all_finite(t):
            raise NonFiniteError(f"{name} holds NaN or Inf values", path=path, key=key)


def _flat_runs(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors as flat views, those adjacent in one storage (same dtype, contiguous) merged
    into one view each. Every entry of every tensor is in exactly one run (duplicates aside)."""
    where: list[tuple[int, int, int, torch.Tensor]] = []  # (storage, byte start, byte end, t)
    runs: list[torch.Tensor] = []
    for t in tensors:
        if t.numel() == 0:
            continue
        if t.is_contiguous() and t.layout is torch.strided:
            lo = t.storage_offset() * t.element_size()
            where.append((t.untyped_storage().data_ptr(), lo, lo + t.numel() * t.element_size(), t))
        else:
            runs.append(t)
    where.sort(key=lambda w: w[:3])
    i = 0
    while i < len(where):
        ptr, lo, hi, first = where[i]
        j = i + 1
        while (j < len(where) and where[j][0] == ptr and where[j][1] == hi
               and where[j][3].dtype == first.dtype and where[j][3].device == first.device):
            hi = where[j][2]
            j += 1
        if j == i + 1:
            runs.append(first.reshape(-1))
        else:
            size = first.element_size()
            runs.append(first.new_empty(0).set_(first.untyped_storage(), lo // size,
                                                ((hi - lo) // size,)))  # (entries,)
        i = j
    return runs


@dataclass
class Adapter:
    """A whole adapter: its modules, the non-LoRA tensors and what was read with them.

    Fields:
        modules: ordered ``{module path: LoraModule}`` without format prefixes.
        extras: non-LoRA tensors (heads, modules_to_save, embeddings) kept verbatim, keyed
            without the format prefix (PEFT ``base_model.model.classifier.weight`` is
            ``classifier.weight``).
        base_model: base model name or path, when known.
        source_format: ``"peft"``, ``"diffusers"`` or ``"kohya"`` (None when built in memory).
        layout: the precise on-disk layout read (e.g. ``"diffusers_legacy_processor"``).
        config: the original PEFT config (or ``{}``), kept so a round trip changes nothing.
        metadata: the safetensors ``__metadata__`` read from the file.
        source: where it was loaded from.
        component_prefix: module keys start with a diffusion component (``unet.``,
            ``text_encoder.``, ...). Set by the diffusers/kohya readers; a GPT-2 key such as
            ``transformer.h.0.attn.c_attn`` is a plain module path when this is False.

    Example:
        >>> import torch
        >>> a = Adapter(modules={"q": LoraModule(torch.ones(1, 2), torch.ones(3, 1), alpha=1)})
        >>> a.ranks()
        {'q': 1}
    """

    modules: dict[str, LoraModule] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    base_model: str | None = None
    source_format: str | None = None
    layout: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    source: str | None = None
    component_prefix: bool = False

    def split_key(self, key: str) -> tuple[str | None, str]:
        """``(component, path)`` of a module key (component None without a prefix)."""
        if not self.component_prefix:
            return None, key
        from lorakit.naming import split_component

        return split_component(key)

    def ranks(self) -> dict[str, int]:
        return {k: m.rank for k, m in self.modules.items()}

    def alphas(self) -> dict[str, float]:
        return {k: float(m.alpha) for k, m in self.modules.items()}

    def scales(self) -> dict[str, float]:
        return {k: m.scale for k, m in self.modules.items()}

    def num_params(self, include_extras: bool = False) -> int:
        n = sum(m.num_params() for m in self.modules.values())
        if include_extras:
            n += sum(t.numel() for t in self.extras.values())
        return n

    def dtypes(self) -> list[str]:
        seen: list[str] = []
        for m in self.modules.values():
            name = str(m.dtype).replace("torch.", "")
            if name not in seen:
                seen.append(name)
        return seen

    @property
    def is_dora(self) -> bool:
        return any(m.magnitude is not None for m in self.modules.values())

    @property
    def uses_rslora(self) -> bool:
        return any(m.rslora for m in self.modules.values())

    def components(self) -> list[str]:
        """Diffusion pipeline components present as the first key segment (may be empty)."""
        out: list[str] = []
        for k in self.modules:
            comp, _ = self.split_key(k)
            if comp and comp not in out:
                out.append(comp)
        return out

    def validate(self) -> None:
        """Raise a named error for the first module that cannot form an update or holds NaN/Inf."""
        for key, m in self.modules.items():
            m.validate(key, self.source, finite=False)
        check_finite(self.modules, self.source)

    def copy(self, **changes: Any) -> Adapter:
        """Shallow copy with fields replaced (tensors are shared, never mutated in place)."""
        base = replace(self, modules=dict(self.modules), extras=dict(self.extras),
                       config=dict(self.config), metadata=dict(self.metadata))
        return replace(base, **changes) if changes else base
