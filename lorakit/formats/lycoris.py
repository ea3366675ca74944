"""LyCORIS modules in kohya-named files, read into their exact LoRA form.

A LyCORIS file names each module as kohya does (``lora_unet_...``, ``lora_te_...``,
``lora_te1_``/``lora_te2_``; the LyCORIS wrapper's ``lycoris_...`` prefix is read too) and gives it
one of these tensor sets (published key schemes of KohakuBlueleaf/LyCORIS ``lycoris/modules``):

=================  =====================================================  =====================
type               tensors                                                update (before scale)
=================  =====================================================  =====================
LoRA / LoCon       ``lora_down.weight``, ``lora_up.weight``               ``up @ down``
LoCon-Tucker       ... + ``lora_mid.weight (r, r, kh, kw)``               ``rebuild_tucker``
LoHa               ``hada_w1_a/b``, ``hada_w2_a/b`` [``hada_t1/t2``]       ``(w1a@w1b)*(w2a@w2b)``
LoKr               ``lokr_w1`` or ``lokr_w1_a/b``; ``lokr_w2`` or          ``kron(w1, w2)``
                   ``lokr_w2_a/b`` [``lokr_t2``]
full               ``diff`` [``diff_b``]                                  ``diff``
=================  =====================================================  =====================

plus ``alpha`` (a scalar) and ``dora_scale`` (DoRA, :mod:`lorakit.formats.dora`) on any of them.

Scale (LyCORIS's modules, ComfyUI's loader agrees): ``alpha / dim``, where ``dim`` is the inner
rank: LoHa ``hada_w1_b.shape[0]``, LoCon ``lora_down.shape[0]``, LoKr ``lokr_w1_b.shape[0]`` when
w1 is factored, else ``lokr_w2_b.shape[0]`` when w2 is. So when only w2 is factored, alpha scales
by w2's rank; when only w1 is, by w1's; when neither is (full ``lokr_w1`` and ``lokr_w2``) the
scale is 1 and the stored alpha has no effect (LyCORIS sets ``alpha = dim`` there). A missing alpha
means scale 1. An alpha of 0 is refused: LyCORIS reads it as "no scaling", ComfyUI as a zero
update. A LoKr whose two factors have different inner ranks is refused (the scale's ``dim`` is then
ambiguous), as are ``lokr_t1`` cores, GLoRA, OFT/BOFT, IA3 and norm-layer modules, by name.
A ``diff_b`` becomes the module's output bias (PEFT ``lora_bias``; the diff module's scale is 1).

Every module becomes a :class:`~lorakit.adapter.LoraModule` whose ``scale * B @ A`` is exactly the
LyCORIS update (:mod:`lorakit.lowrank.exact_forms`), in float32 for fp16/bf16 files (products of
two half-precision values are exact in float32) and the file's dtype otherwise; ``origin`` names
the LyCORIS type and ``file_dtype`` the file's dtype, which rank-changing outputs are written in.

Conv kernels. LoHa and LoKr conv modules are often stored as 2-D products ``(out, in*kh*kw)``
that the loader reshapes to the base weight; a Tucker core, a 4-D factor or a ``diff`` gives the
kernel itself. Without a base model, the kernel of a 2-D product comes from the kohya name of the
diffusers UNet module: ``resnets_N_conv1/conv2``, ``downsamplers_N_conv``, ``upsamplers_N_conv``,
``conv_in``, ``conv_out`` are 3x3 convs, ``conv_shortcut`` a 1x1 conv, and ``attentions_N_proj_in/
proj_out`` 1x1 convs when the file's kohya metadata says SD1.x (``ss_v2`` false, no SDXL/v2
``ss_base_model_version``). Every other 2-D product is a linear layer.

Example:
    >>> import torch
    >>> g = {"lokr_w1": torch.ones(2, 2), "lokr_w2_a": torch.ones(3, 1),
    ...      "lokr_w2_b": torch.ones(1, 4), "alpha": torch.tensor(1.0)}
    >>> m = module_from_group("lora_unet_x", g, "f.safetensors")
    >>> m.origin, m.rank, tuple(m.delta().shape), float(m.delta()[0, 0])
    ('lokr', 2, (6, 8), 1.0)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.adapter import LoraModule, ModuleKind, check_finite
from lorakit.errors import (
    ConfigMismatchError,
    CorruptFileError,
    NonFiniteError,
    ShapeMismatchError,
    UnknownLayoutError,
    UnsupportedVariantError,
)
from lorakit.lowrank.exact_forms import Factor, dense_form, fold_tucker, hadamard_form, kron_form

LAYOUT = "lycoris"

LORA = "lora"
LOHA = "loha"
LOKR = "lokr"
LOCON_TUCKER = "locon-tucker"
FULL = "diff"

# suffix -> the module type it belongs to ("alpha" and "dora_scale" fit every type)
SUFFIXES: dict[str, str | None] = {
    "lora_down.weight": LORA, "lora_up.weight": LORA, "lora_mid.weight": LOCON_TUCKER,
    "hada_w1_a": LOHA, "hada_w1_b": LOHA, "hada_w2_a": LOHA, "hada_w2_b": LOHA,
    "hada_t1": LOHA, "hada_t2": LOHA,
    "lokr_w1": LOKR, "lokr_w1_a": LOKR, "lokr_w1_b": LOKR, "lokr_w2": LOKR, "lokr_w2_a": LOKR,
    "lokr_w2_b": LOKR, "lokr_t2": LOKR,
    "diff": FULL, "diff_b": FULL,
    "alpha": None, "dora_scale": None,
}
# LyCORIS suffixes of types that have no exact LoRA form: refused by name
REFUSED: dict[str, str] = {
    "oft_blocks": "OFT/BOFT (oft_blocks)", "rescale": "OFT/BOFT (rescale)",
    "a1.weight": "GLoRA", "a2.weight": "GLoRA", "b1.weight": "GLoRA", "b2.weight": "GLoRA",
    "bm.weight": "GLoRA", "on_input": "IA3 (on_input)", "w_norm": "a LyCORIS norm layer (w_norm)",
    "b_norm": "a LyCORIS norm layer (b_norm)",
    "lokr_t1": "LoKr with a Tucker core on w1 (lokr_t1, which LyCORIS never writes)",
}
_MARKERS = {s for s, t in SUFFIXES.items() if t not in (None, LORA)}
_STEM = re.compile(r"^(?:lora|lycoris)_[A-Za-z0-9_]+$")


def _split(key: str) -> tuple[str, str] | None:
    """``(stem, suffix)`` of a kohya-named key, or None."""
    stem, dot, suffix = key.partition(".")
    return (stem, suffix) if dot and _STEM.match(stem) else None


def classify(keys: list[str], path: Path | str | None = None) -> str | None:
    """``"lycoris"`` when kohya-named keys carry LyCORIS tensors, else None; a LyCORIS type that
    has no exact LoRA form raises :class:`UnsupportedVariantError` naming the first such key.

    Example:
        >>> classify(["lora_unet_a.hada_w1_a", "lora_unet_a.hada_w1_b"])
        'lycoris'
        >>> classify(["lora_unet_a.lora_down.weight"]) is None
        True
    """
    found = False
    for k in keys:
        parts = _split(k)
        if parts is None:
            continue
        if parts[1] in REFUSED:
            raise UnsupportedVariantError(
                f"{REFUSED[parts[1]]} is a LyCORIS type with no exact LoRA form; lorakit reads "
                "LoRA, LoCon, LoHa, LoKr, full diff and DoRA modules", path=path, key=k)
        found = found or parts[1] in _MARKERS
    return LAYOUT if found else None


def group_tensors(tensors: Mapping[str, torch.Tensor], path: Path | str
                  ) -> dict[str, dict[str, torch.Tensor]]:
    """``{kohya module name: {suffix: tensor}}``; a key that fits no module is an
    :class:`UnknownLayoutError` naming it."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in tensors.items():
        parts = _split(k)
        if parts is None or parts[1] not in SUFFIXES:
            suffix = parts[1] if parts else k
            raise UnknownLayoutError(
                f"tensor {suffix!r} is not part of a LoRA or LyCORIS module lorakit reads",
                path=path, key=k)
        groups.setdefault(parts[0], {})[parts[1]] = t
    return groups


def split_known(tensors: Mapping[str, torch.Tensor]
                ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(tensors of LoRA/LyCORIS modules, keys that fit none)``: the kohya reader accounts for
    the unknown keys (an error naming them, or ``--ignore-unknown``).

    Example:
        >>> split_known({"lora_unet_a.hada_w1_a": torch.zeros(1), "x": torch.zeros(1)})[1]
        ['x']
    """
    known: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for k, t in tensors.items():
        parts = _split(k)
        if parts is None or parts[1] not in SUFFIXES:
            unknown.append(k)
        else:
            known[k] = t
    return known, unknown


@dataclass
class _Exact:
    """An exact form: ``scale * up @ down`` with ``up (out, R)``, ``down (R, cols)``."""

    up: torch.Tensor
    down: torch.Tensor
    scale: float
    kernel: tuple[int, ...] | None  # given by the file's tensors (None: a 2-D product)
    origin: str
    bias: torch.Tensor | None = None


class _Group:
    """One module's tensors with named lookups (errors name ``stem.suffix``)."""

    def __init__(self, stem: str, tensors: Mapping[str, torch.Tensor], path: Path | str,
                 work: torch.dtype) -> None:
        self.stem, self.tensors, self.path, self.work = stem, tensors, path, work

    def key(self, suffix: str) -> str:
        return f"{self.stem}.{suffix}"

    def has(self, suffix: str) -> bool:
        return suffix in self.tensors

    def get(self, suffix: str, ndim: tuple[int, ...] = (2,)) -> torch.Tensor:
        """The tensor in the working dtype; a missing one or a wrong rank is named."""
        t = self.tensors.get(suffix)
        if t is None:
            raise ConfigMismatchError(f"{suffix} is missing for this {self.kind()} module",
                                      path=self.path, key=self.key(suffix))
        if t.ndim not in ndim:
            raise ShapeMismatchError(f"{suffix} must be {' or '.join(f'{n}-D' for n in ndim)}, "
                                     f"got shape {tuple(t.shape)}", path=self.path,
                                     key=self.key(suffix))
        return t.to(self.work)

    def kind(self) -> str:
        types = {SUFFIXES[s] for s in self.tensors} - {None, LORA}
        return "/".join(sorted(NAMES[t] for t in types if t)) or "LoRA"

    def mismatch(self, what: str, suffix: str) -> ShapeMismatchError:
        shapes = ", ".join(f"{s} {tuple(t.shape)}" for s, t in self.tensors.items()
                           if s not in ("alpha",))
        return ShapeMismatchError(f"{what} ({shapes})", path=self.path, key=self.key(suffix))

    def scale(self, dim: int | None) -> float:
        """``alpha / dim``; 1 when no alpha is stored or no factor is low-rank (``dim`` None)."""
        from lorakit.formats.common import scalar_value

        if "alpha" not in self.tensors or dim is None:
            return 1.0
        alpha = scalar_value(self.tensors["alpha"], self.key("alpha"), self.path)
        if alpha == 0:
            raise ConfigMismatchError(
                "alpha is 0: LyCORIS reads it as no scaling, ComfyUI as a zero update",
                path=self.path, key=self.key("alpha"), hint="store alpha = rank for scale 1")
        return alpha / dim


def _matrix(t: torch.Tensor) -> torch.Tensor:
    """A factor stored with trailing 1x1 kernel dims (``(out, r, 1, 1)``) as a matrix."""
    return t.reshape(t.shape[0], -1)


def _left(g: _Group, suffix: str, ndim: tuple[int, ...] = (2, 4)) -> torch.Tensor:
    """A left (output-side) factor ``(out, r[, 1, 1])`` as a matrix; a real kernel is named."""
    t = g.get(suffix, ndim)
    if t.ndim == 4 and tuple(t.shape[2:]) != (1, 1):
        raise g.mismatch(f"{suffix} must end in 1x1, got {tuple(t.shape)}", suffix)
    return _matrix(t)


def _loha(g: _Group) -> _Exact:
    """LoHa: ``scale * (w1a @ w1b) * (w2a @ w2b)`` (Tucker: each product rebuilt with its core)."""
    if g.has("hada_t1") != g.has("hada_t2"):
        raise ConfigMismatchError("Tucker LoHa needs both hada_t1 and hada_t2", path=g.path,
                                  key=g.key("hada_t1" if g.has("hada_t1") else "hada_t2"))
    factors: list[Factor] = []
    kernel: tuple[int, ...] | None = None
    for i in (1, 2):
        a, b = _left(g, f"hada_w{i}_a"), g.get(f"hada_w{i}_b", (2, 4))
        if g.has(f"hada_t{i}"):  # t (r, r, *k), a (r, out), b (r, in)
            t = g.get(f"hada_t{i}", (3, 4, 5))
            if (t.shape[0], t.shape[1]) != (a.shape[0], b.shape[0]) or b.ndim != 2:
                raise g.mismatch("Tucker core does not fit its factors", f"hada_t{i}")
            kernel = tuple(int(s) for s in t.shape[2:])
            factors.append(Factor(left=a.T, right=fold_tucker(t, b)))
        else:  # a (out, r[, 1, 1]), b (r, in * k) or (r, in, kh, kw)
            if b.ndim == 4:
                kernel = tuple(int(s) for s in b.shape[2:])
            if a.shape[1] != b.shape[0]:
                raise g.mismatch("factor ranks disagree", f"hada_w{i}_b")
            factors.append(Factor(left=a, right=_matrix(b)))
    if factors[0].shape != factors[1].shape:
        raise g.mismatch("the two Hadamard factors differ in shape", "hada_w2_a")
    up, down = hadamard_form(factors[0], factors[1])
    origin = "loha-tucker" if g.has("hada_t1") else LOHA
    return _Exact(up, down, g.scale(int(g.tensors["hada_w1_b"].shape[0])), kernel, origin)


def _lokr_w1(g: _Group) -> Factor:
    if g.has("lokr_w1"):
        if g.has("lokr_w1_a") or g.has("lokr_w1_b"):
            raise ConfigMismatchError("LoKr w1 is stored both full and factored", path=g.path,
                                      key=g.key("lokr_w1"))
        return Factor(full=g.get("lokr_w1"))
    a, b = g.get("lokr_w1_a"), g.get("lokr_w1_b")
    if a.shape[1] != b.shape[0]:
        raise g.mismatch("lokr_w1_a and lokr_w1_b ranks disagree", "lokr_w1_b")
    return Factor(left=a, right=b)


def _lokr_w2(g: _Group) -> tuple[Factor, tuple[int, ...] | None]:
    """w2 as a factor flattened to ``(b, d * kh * kw)``, and the kernel when the file gives it."""
    if g.has("lokr_w2"):
        if g.has("lokr_w2_a") or g.has("lokr_w2_b") or g.has("lokr_t2"):
            raise ConfigMismatchError("LoKr w2 is stored both full and factored", path=g.path,
                                      key=g.key("lokr_w2"))
        w2 = g.get("lokr_w2", (2, 3, 4, 5))
        return Factor(full=w2.reshape(w2.shape[0], -1)), _kernel_of(w2)
    a = g.get("lokr_w2_a")
    if g.has("lokr_t2"):  # t (r, r, *k), a (r, b), b (r, d)
        b, t = g.get("lokr_w2_b"), g.get("lokr_t2", (3, 4, 5))
        if (t.shape[0], t.shape[1]) != (a.shape[0], b.shape[0]):
            raise g.mismatch("Tucker core does not fit its factors", "lokr_t2")
        return Factor(left=a.T, right=fold_tucker(t, b)), tuple(int(s) for s in t.shape[2:])
    b = g.get("lokr_w2_b", (2, 3, 4, 5))  # (r, d * k) or (r, d, *k)
    if a.shape[1] != b.shape[0]:
        raise g.mismatch("lokr_w2_a and lokr_w2_b ranks disagree", "lokr_w2_b")
    return Factor(left=a, right=b.reshape(b.shape[0], -1)), _kernel_of(b)


def _kernel_of(t: torch.Tensor) -> tuple[int, ...] | None:
    return tuple(int(s) for s in t.shape[2:]) if t.ndim > 2 else None


def _lokr(g: _Group) -> _Exact:
    """LoKr: ``scale * kron(w1, w2)``, each factor full or a product (w2 maybe with a core)."""
    f1 = _lokr_w1(g)
    f2, kernel = _lokr_w2(g)
    dims = [int(g.tensors[s].shape[0]) for s in ("lokr_w1_b", "lokr_w2_b") if g.has(s)]
    if len(set(dims)) > 1:
        raise UnsupportedVariantError(
            f"LoKr with inner ranks {dims[0]} (w1) and {dims[1]} (w2): its alpha/dim scale is "
            "ambiguous (LyCORIS uses one rank for both)", path=g.path, key=g.key("lokr_w2_b"))
    up, down = kron_form(f1, f2)
    origin = "lokr-tucker" if g.has("lokr_t2") else LOKR
    return _Exact(up, down, g.scale(dims[0] if dims else None), kernel, origin)


def _locon_tucker(g: _Group) -> _Exact:
    """LoCon with a Tucker core: ``scale * up @ fold(mid, down)``, a conv LoRA of the same rank."""
    down = _left(g, "lora_down.weight")  # (r, in[, 1, 1])
    up = _left(g, "lora_up.weight")  # (out, r[, 1, 1])
    mid = g.get("lora_mid.weight", (3, 4, 5))  # (r, r, kh, kw)
    if (mid.shape[0], mid.shape[1]) != (up.shape[1], down.shape[0]):
        raise g.mismatch("Tucker core does not fit lora_up/lora_down", "lora_mid.weight")
    right = fold_tucker(mid, down)  # (r, in * kh * kw)
    return _Exact(up, right, g.scale(int(down.shape[0])),
                  tuple(int(s) for s in mid.shape[2:]), LOCON_TUCKER)


def _full(g: _Group) -> _Exact:
    """A full ``diff`` (and ``diff_b``): the dense update itself, scale 1."""
    if g.has("alpha"):
        raise ConfigMismatchError("alpha beside a full diff module (LyCORIS stores none)",
                                  path=g.path, key=g.key("alpha"))
    diff = g.get("diff", (2, 3, 4, 5))  # (out, in, *k)
    up, down = dense_form(diff.reshape(diff.shape[0], -1))
    bias = None
    if g.has("diff_b"):
        bias = g.tensors["diff_b"]
        if tuple(bias.shape) != (diff.shape[0],):
            raise g.mismatch(f"diff_b must have shape ({diff.shape[0]},)", "diff_b")
    return _Exact(up, down, 1.0, _kernel_of(diff), FULL, bias)


_BUILDERS = {LOHA: _loha, LOKR: _lokr, LOCON_TUCKER: _locon_tucker, FULL: _full}


NAMES = {LORA: "LoRA", LOHA: "LoHa", LOKR: "LoKr", LOCON_TUCKER: "LoCon-Tucker",
         FULL: "full diff"}


def _type(g: _Group) -> str:
    types = {SUFFIXES[s] for s in g.tensors} - {None}
    if LOCON_TUCKER in types:
        types.discard(LORA)
    if len(types) > 1:  # name the first tensor of a LyCORIS type beside the others
        odd = next(s for s in g.tensors if SUFFIXES[s] not in (None, LORA))
        raise UnsupportedVariantError(
            f"module mixes {' and '.join(sorted(NAMES[t] for t in types))} tensors, which no "
            "LyCORIS type does", path=g.path, key=g.key(odd))
    if not types:
        raise ConfigMismatchError("alpha/dora_scale without module factors", path=g.path,
                                  key=g.key(next(iter(g.tensors))))
    return types.pop()


def _work_dtype(g: Mapping[str, torch.Tensor], stem: str, path: Path | str) -> torch.dtype:
    for s, t in g.items():
        if not t.is_floating_point():
            raise CorruptFileError(f"LyCORIS tensors must be floating point, got {t.dtype}",
                                   path=path, key=f"{stem}.{s}")
    return torch.float64 if any(t.dtype == torch.float64 for t in g.values()) else torch.float32


def _shaped(ex: _Exact, kernel: tuple[int, ...] | None, g: _Group) -> tuple[torch.Tensor,
                                                                            torch.Tensor, bool]:
    """``(up, down, is_conv)`` in lorakit's layout for the kernel (file's, else the name's)."""
    k = ex.kernel if ex.kernel is not None else kernel
    r, cols = int(ex.down.shape[0]), int(ex.down.shape[1])
    if k is None:
        return ex.up, ex.down, False
    if len(k) != 2:
        raise UnsupportedVariantError(f"a {len(k) + 2}-D conv kernel {k}: lorakit reads linear "
                                      "and 2-D conv modules", path=g.path, key=g.key(
                                          next(iter(g.tensors))))
    size = math.prod(k)
    if cols % size:
        raise g.mismatch(f"{cols} columns do not hold a {k[0]}x{k[1]} kernel", next(iter(
            g.tensors)))
    return ex.up.reshape(-1, r, 1, 1), ex.down.reshape(r, cols // size, *k), True


def module_from_group(stem: str, tensors: Mapping[str, torch.Tensor], path: Path | str, *,
                      kernel: tuple[int, ...] | None = None) -> LoraModule:
    """The exact :class:`LoraModule` of one kohya-named module's tensors (``{suffix: tensor}``).

    ``kernel`` is the conv kernel for updates the file stores as 2-D products (see
    :func:`conv_kernel`); a kernel the tensors give themselves wins. Errors name the file and the
    ``stem.suffix`` key. NaN/Inf are left to the caller (:func:`read_lycoris` checks them).

    Example:
        >>> g = {"hada_w1_a": torch.ones(4, 1), "hada_w1_b": torch.ones(1, 3),
        ...      "hada_w2_a": torch.ones(4, 2), "hada_w2_b": torch.ones(2, 3)}
        >>> m = module_from_group("lora_te_q", g, "f.safetensors")
        >>> m.origin, m.rank, float(m.delta()[0, 0])     # (1*1) * (1+1), no alpha: scale 1
        ('loha', 2, 2.0)
    """
    from lorakit.formats.dora import magnitude_axis

    g = _Group(stem, tensors, path, _work_dtype(tensors, stem, path))
    kind = _type(g)
    if kind == LORA:
        return _lora(g)
    ex = _BUILDERS[kind](g)
    up, down, conv = _shaped(ex, kernel, g)
    file_dtype = next(t.dtype for s, t in tensors.items() if s not in ("alpha", "dora_scale"))
    rank = int(down.shape[0])
    mod = LoraModule(down=down, up=up, alpha=ex.scale * rank, bias=ex.bias,
                     kind=ModuleKind.CONV if conv else ModuleKind.LINEAR,
                     magnitude=tensors.get("dora_scale"), origin=ex.origin,
                     file_dtype=file_dtype if file_dtype != g.work else None)
    mod.validate(g.key(next(iter(tensors))), str(path), finite=False)
    if mod.magnitude is not None:
        mod.magnitude_axis = magnitude_axis(mod, "lycoris", g.key("dora_scale"), path)
    return mod


def _lora(g: _Group) -> LoraModule:
    """A plain kohya LoRA module (``alpha`` missing means ``alpha = r``)."""
    from lorakit.formats.common import build_modules, scalar_value

    parts = {"down": g.tensors.get("lora_down.weight"), "up": g.tensors.get("lora_up.weight"),
             "magnitude": g.tensors.get("dora_scale")}
    alphas = {}
    if g.has("alpha"):
        alphas[g.stem] = scalar_value(g.tensors["alpha"], g.key("alpha"), g.path)
    parts = {k: v for k, v in parts.items() if v is not None}
    return build_modules({g.stem: parts}, alphas, g.path, dora="lycoris", finite=False)[g.stem]


_CONV3 = re.compile(r"(?:^|_)(?:resnets_\d+_conv[12]|(?:down|up)samplers_\d+_conv|conv_in|conv_out)$")
_PROJ = re.compile(r"_attentions_\d+_proj_(?:in|out)$")


def conv_kernel(stem: str, meta: Mapping[str, str]) -> tuple[int, int] | None:
    """The conv kernel of a kohya UNet module whose update a LyCORIS file stores as a 2-D product,
    or None for a linear layer (the rule is in the module docstring).

    Example:
        >>> conv_kernel("lora_unet_down_blocks_0_resnets_0_conv1", {})
        (3, 3)
        >>> conv_kernel("lora_unet_mid_block_attentions_0_proj_in", {"ss_v2": "False"})
        (1, 1)
        >>> conv_kernel("lora_unet_mid_block_attentions_0_proj_in", {}) is None
        True
    """
    if not stem.startswith("lora_unet_"):
        return None
    if _CONV3.search(stem):
        return (3, 3)
    if stem.endswith("_conv_shortcut"):
        return (1, 1)
    if _PROJ.search(stem) and _is_sd1(meta):
        return (1, 1)
    return None


def _is_sd1(meta: Mapping[str, str]) -> bool:
    """Whether kohya metadata says SD1.x (whose transformer proj_in/proj_out are 1x1 convs)."""
    version = str(meta.get("ss_base_model_version", ""))
    if version:
        return version.startswith("sd_v1")
    return str(meta.get("ss_v2", "")).lower() == "false"


def read_lycoris(tensors: Mapping[str, torch.Tensor], path: Path | str,
                 meta: Mapping[str, str]) -> dict[str, LoraModule]:
    """``{kohya module name: exact LoraModule}`` for every module of a LyCORIS file; any key that
    is not part of a module, and any NaN/Inf, is named.

    Example:
        >>> mods = read_lycoris(tensors, "f.safetensors", meta)   # doctest: +SKIP
    """
    groups = group_tensors(tensors, path)
    classify(list(tensors), path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny products: waking intra-op threads costs more than they do
    try:
        modules = {stem: module_from_group(stem, g, path, kernel=conv_kernel(stem, meta))
                   for stem, g in groups.items()}
    finally:
        torch.set_num_threads(threads)
    try:
        check_finite(modules, str(path))
    except NonFiniteError:
        from lorakit.adapter import all_finite

        for stem, g in groups.items():
            for suffix, t in g.items():
                if not all_finite(t):
                    raise NonFiniteError("holds NaN or Inf values", path=path,
                                         key=f"{stem}.{suffix}") from None
        raise
    return modules


def module_key(stem: str, with_components: bool) -> str:
    """The module key of a kohya or ``lycoris_`` name (the wrapper's prefix has no component).

    Example:
        >>> module_key("lycoris_model_layers_0_self_attn_q_proj", True)
        'model.layers.0.self_attn.q_proj'
    """
    from lorakit.formats.kohya import kohya_module_key

    if stem.startswith("lycoris_"):
        return kohya_module_key("lora_" + stem[len("lycoris_"):], False)
    return kohya_module_key(stem, with_components)


def lora_metadata(meta: Mapping[str, str]) -> dict[str, str]:
    """kohya metadata for the LoRA a LyCORIS file is written back as: ``ss_network_module``
    becomes ``networks.lora`` and the LyCORIS ``ss_network_args`` are dropped (the file written
    holds plain LoRA pairs); the originals are kept under ``lorakit.lycoris_*``.

    Example:
        >>> lora_metadata({"ss_network_module": "lycoris.kohya",
        ...                "ss_network_args": '{"algo": "lokr"}'})["ss_network_module"]
        'networks.lora'
    """
    out = dict(meta)
    module = str(out.get("ss_network_module", ""))
    if not module.startswith("lycoris"):
        return out
    out["lorakit.lycoris_network_module"] = module
    out["ss_network_module"] = "networks.lora"
    if "ss_network_args" in out:
        out["lorakit.lycoris_network_args"] = out.pop("ss_network_args")
    return out


def read_modules(tensors: Mapping[str, torch.Tensor], path: Path | str, meta: Mapping[str, str],
                 with_components: bool) -> tuple[dict[str, LoraModule], dict[str, str]]:
    """``({module key: LoraModule}, {module key: kohya name})`` of a LyCORIS file (the kohya
    reader's hook); two names that map to one key are named.

    Example:
        >>> mods, names = read_modules(tensors, "f.safetensors", meta, True)   # doctest: +SKIP
    """
    modules: dict[str, LoraModule] = {}
    names: dict[str, str] = {}
    for stem, mod in read_lycoris(tensors, path, meta).items():
        key = module_key(stem, with_components)
        if names.setdefault(key, stem) != stem:
            raise ConfigMismatchError(f"two kohya names map to module {key}", path=path,
                                      key=stem)
        modules[key] = mod
    return modules, names
