"""Read and write adapters in every layout lorakit knows, with auto-detection.

The load path runs one way: a *source* resolves to local files (:mod:`lorakit.sources`,
:mod:`lorakit.hub`, not here); :func:`load_adapter` takes a local path, detection
(:mod:`lorakit.formats.detect`) picks the layout, the layout reads an :class:`Adapter`, the
family (:mod:`lorakit.formats.families`) is detected from its module names and every tensor is
accounted for (:mod:`lorakit.formats.coverage`). Writing (:func:`save_adapter`) moves the
adapter to the naming the target layout needs (:mod:`lorakit.formats.rename`: fused <-> split,
exactly) and writes it. :mod:`lorakit.formats.registry` is the table of layouts and families.

Example:
    >>> from lorakit.formats import load_adapter, save_adapter          # doctest: +SKIP
    >>> a = load_adapter("../shared/real_adapters/flux1_aitoolkit_leighwoods")  # doctest: +SKIP
    >>> save_adapter(a, "flux_kohya.safetensors", "kohya")              # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lorakit.adapter import Adapter
from lorakit.errors import (
    ConfigMismatchError,
    CorruptFileError,
    LorakitError,
    OptionError,
    ShapeMismatchError,
)
from lorakit.formats.families import Family, detect_family, get_family
from lorakit.formats.registry import LAYOUTS, Format, parse_format

FAMILY_KEY = "lorakit.family"  # metadata: the family detected at load (or named by --family)


def load_adapter(path: str | Path, format: Format | str | None = None, *,
                 family: str | None = None, ignore_unknown: bool = False) -> Adapter:
    """Load an adapter from a local PEFT folder, a weights file (diffusers, kohya, BFL/ComfyUI,
    XLabs, ai-toolkit, ...) or a folder holding one. ``hf://`` sources are resolved by
    :func:`lorakit.load` / :mod:`lorakit.sources`.

    ``family`` overrides detection (``flux1``, ``sd3``, ``sdxl``, ``sd15``, ``wan``,
    ``qwenimage``, ``ltxvideo``, ``hunyuanvideo``, ``lumina2``, ``hidream``, ``flux2``,
    ``zimage``, ``ltx2``, ``ideogram4``, ``krea2``, ``acestep``, ``minimaxh3``, ``flux3``,
    ``anima``). Keys that fit no layout role or name no module of the family are an error
    naming them, or with ``ignore_unknown`` are dropped and listed (:func:`lorakit.formats.coverage.ignored`).
    Any failure is a :class:`~lorakit.errors.LorakitError` naming the file, key and problem.

    Example:
        >>> a = load_adapter("../shared/real_adapters/gpt2_r4_jhess")   # doctest: +SKIP
        >>> a.source_format, len(a.modules)                              # doctest: +SKIP
        ('peft', 36)
    """
    if isinstance(path, str) and path.startswith("hf://"):
        raise OptionError("Hub sources are loaded by lorakit.load (lorakit.sources)", path=path,
                          hint="call lorakit.load(...) or resolve it with "
                               "lorakit.sources.local_path first")
    path = Path(path)
    try:
        return _load(path, parse_format(format) if format else None, family, ignore_unknown)
    except LorakitError:
        raise
    except (ValueError, IndexError, RuntimeError, KeyError, TypeError, OverflowError) as e:
        # Defensive: malformed content that slipped past the checks must still be named.
        raise CorruptFileError(f"unreadable adapter content ({type(e).__name__}: {e})",
                               path=path) from e


def _read(path: Path, fmt: Format | None) -> tuple[Adapter, list[str]]:
    from lorakit.formats import diffusers, kohya, prefixed
    from lorakit.formats.detect import detect_format, weights_in_folder
    from lorakit.formats.peft import load_peft
    from lorakit.io import read_pickle, read_safetensors

    detected, layout = detect_format(path)
    if fmt is not None and fmt.value != detected and not (
            detected == "diffusers" and fmt in (Format.AITOOLKIT, Format.SIMPLETUNER)):
        raise ConfigMismatchError(f"asked to read it as {fmt.value} but it is {detected} "
                                  f"({layout})", path=path)
    if detected == "peft":
        unknown: list[str] = []  # LoRA-like keys of no role (other tensors are extras)
        return load_peft(path, unknown), unknown
    file = weights_in_folder(path) if path.is_dir() else path
    if file.suffix == ".safetensors":
        tensors, meta = read_safetensors(file)
    else:
        tensors, meta = read_pickle(file), {}
    if detected == "kohya":
        return kohya.load_kohya(file, tensors, meta, layout)
    if detected in prefixed.SPELLINGS:
        return prefixed.load_prefixed(file, tensors, meta, layout)
    if layout == "diffsynth":
        from lorakit.formats.diffsynth import load_diffsynth

        return load_diffsynth(file, tensors, meta)
    return diffusers.load_diffusers(file, tensors, meta, layout)


def _load(path: Path, fmt: Format | None, family: str | None,
          ignore_unknown: bool) -> Adapter:
    from lorakit.formats.coverage import account

    adapter, unknown = _read(path, fmt)
    fam = get_family(family) if family else adapter_family(adapter)
    adapter = account(adapter, unknown, fam, ignore_unknown=ignore_unknown)
    if fam is not None:  # kept, so a later conversion of this adapter knows its family
        adapter.metadata[FAMILY_KEY] = fam.name
    if fam is not None and fam.name == "minimaxh3":
        _network_alpha(adapter, path)
    if fam is not None and adapter.source_format == "peft" and "peftnative" in fam.layouts:
        from lorakit.formats.rename import naming_of

        if naming_of(adapter, fam) == "native":  # ACE-Step's own trainer: written back as read
            adapter.source_format = adapter.layout = "peftnative"
    return adapter


def _network_alpha(adapter: Adapter, path: Path) -> None:
    """A MiniMax-H3 file with no ``.alpha`` tensor that records an ``alpha`` in its safetensors
    metadata was trained with that network alpha: every module's scale is ``alpha / r`` (as
    diffusers' MiniMax-H3 reader takes it; without one, ``alpha = r``). A value that is no
    number is an error naming the file and the key."""
    from lorakit.errors import ConfigMismatchError
    from lorakit.io import read_safetensors_header

    value = adapter.metadata.get("alpha")
    if value is None or not path.is_file() or path.suffix != ".safetensors":
        return
    header, _ = read_safetensors_header(path)
    if any(k.endswith(".alpha") for k in header):
        return  # per-module alphas win
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        raise ConfigMismatchError(f"metadata alpha {value!r} is no number", path=path,
                                  key="__metadata__.alpha") from None
    for m in adapter.modules.values():
        m.alpha = alpha


def adapter_family(adapter: Adapter) -> Family | None:
    """The model family of an adapter's modules (names, then metadata, then shapes), or None.

    Example:
        >>> adapter_family(load_adapter("flux_lora.safetensors")).name   # doctest: +SKIP
        'flux1'
    """
    if not adapter.modules:
        return None
    shapes = {k: (m.out_features, m.in_features) for k, m in adapter.modules.items()
              if m.down.ndim >= 2}
    return detect_family(list(adapter.modules), adapter.metadata, shapes,
                         component_prefix=adapter.component_prefix)


def default_output_name(fmt: Format) -> str | None:
    """File name used when the output of a file layout is given as a folder."""
    if fmt is Format.PEFT:
        return None
    return "lora.safetensors" if fmt is Format.KOHYA else "pytorch_lora_weights.safetensors"


def _family_for(adapter: Adapter, family: Family | str | None) -> Family | None:
    if isinstance(family, str):
        return get_family(family)
    return family if family is not None else adapter_family(adapter)


def to_layout(adapter: Adapter, fmt: Format | str, family: Family | str | None = None
              ) -> tuple[Adapter, Family | None]:
    """``adapter`` with its keys in the naming layout ``fmt`` writes, and the family used.

    Example:
        >>> to_layout(flux_diffusers, "kohya")[0].modules   # doctest: +SKIP
    """
    from lorakit.formats.rename import to_naming

    fmt = parse_format(fmt)
    fam = _family_for(adapter, family)
    layout = LAYOUTS[fmt.value]
    naming = layout.naming_for(fam.name if fam else None)
    if fmt is Format.KOHYA and fam is not None and fam.name == "sdxl" and \
            adapter.source_format == "kohya":
        naming = None  # SDXL kohya -> kohya keeps its names (SGM or diffusers) as read
    if fam is not None and fmt.value not in fam.layouts and fmt is not Format.PEFT:
        raise OptionError(f"{fam.title} adapters have no {fmt.value} layout (its layouts: "
                          f"{', '.join(fam.layouts)})", path=adapter.source)
    if fam is None and fmt in (Format.BFL, Format.XLABS, Format.FALKONTEXT, Format.BFLCONTROL,
                               Format.PEFTNATIVE):
        raise OptionError(f"the {fmt.value} layout needs a model family and none was detected",
                          path=adapter.source, hint="name it with --family")
    if fam is None or naming is None:
        return adapter, fam
    return to_naming(adapter, fam, naming), fam


def save_adapter(adapter: Adapter, out: str | Path, format: Format | str | None = None, *,
                 force: bool = False, dtype: torch.dtype | None = None,
                 provenance: dict[str, Any] | None = None,
                 family: Family | str | None = None) -> Path:
    """Write ``adapter`` atomically; ``format`` (a layout name) defaults to the one it was read
    from (else PEFT). Keys move to the naming the layout needs first (exactly).

    PEFT output is a folder. Other layouts write one ``.safetensors`` file; if ``out`` has no
    ``.safetensors`` suffix it is a folder holding ``pytorch_lora_weights.safetensors`` (or
    ``lora.safetensors`` for kohya). Returns the path written.

    Example:
        >>> save_adapter(a, "out_dir", "peft", force=True)   # doctest: +SKIP
    """
    from lorakit.io import atomic_output

    fmt = parse_format(format or adapter.source_format or "peft")
    adapter.validate()
    adapter, fam = to_layout(adapter, fmt, family)
    out = Path(out)
    if fmt in (Format.PEFT, Format.PEFTNATIVE):
        from lorakit.formats.peft import save_peft

        with atomic_output(out, force=force, is_dir=True) as tmp:
            save_peft(adapter, tmp, dtype=dtype, provenance=provenance)
        return out

    def write(file: Path) -> None:
        _write_file(adapter, file, fmt, fam, dtype, provenance)

    if out.suffix != ".safetensors":
        folder = out
        out = folder / str(default_output_name(fmt))
        with atomic_output(folder, force=force, is_dir=True) as tmp:
            write(tmp / out.name)
        return out
    with atomic_output(out, force=force) as tmp:
        write(tmp)
    return out


def _write_file(adapter: Adapter, file: Path, fmt: Format, fam: Family | None,
                dtype: torch.dtype | None, provenance: dict[str, Any] | None) -> None:
    from lorakit.formats import diffusers, kohya, prefixed

    if fmt is Format.KOHYA:
        kohya.save_kohya(adapter, file, dtype=dtype, provenance=provenance, family=fam)
    elif fmt in (Format.BFL, Format.XLABS, Format.FALKONTEXT, Format.BFLCONTROL):
        spelling = prefixed.WRITE_SPELLING.get((fmt.value, fam.name if fam else ""),
                                                prefixed.SPELLINGS[fmt.value])
        prefixed.save_prefixed(adapter, file, spelling, dtype=dtype,
                               provenance=provenance, family=fam.name if fam else None)
    else:
        diffusers.save_diffusers(adapter, file, dtype=dtype, provenance=provenance,
                                 flavour=fmt.value, family=fam.name if fam else None)


def select_component(adapter: Adapter, component: str | None) -> Adapter:
    """Keep one diffusion component's modules and strip its prefix (for PEFT output).

    Example:
        >>> select_component(sd_adapter, "unet").components()   # doctest: +SKIP
        []
    """
    if not adapter.component_prefix:
        return adapter
    if component is None:
        comps = adapter.components()
        if len(comps) == 1 and all(adapter.split_key(k)[0] for k in adapter.modules):
            component = comps[0]
        else:
            return adapter
    mods = {}
    for k, m in adapter.modules.items():
        comp, rest = adapter.split_key(k)
        if comp == component:
            mods[rest] = m
    if not mods:
        raise OptionError(f"no modules in component {component!r} "
                          f"(components: {adapter.components() or 'none'})", path=adapter.source)
    extras = {}
    for k, t in adapter.extras.items():  # a control LoRA's norm scales go with the denoiser
        comp, rest = adapter.split_key(k)
        if comp not in (None, component):
            raise OptionError(f"extra tensor of component {comp!r} has no place in a PEFT folder "
                              f"of {component!r}", path=adapter.source, key=k)
        extras[rest] = t
    out = adapter.copy(modules=mods, extras=extras, component_prefix=False)
    cls = next((c for c, comp in _CLASS_COMPONENT.items() if comp == component), None)
    fam = adapter_family(adapter)
    if fam is not None and component == fam.denoiser.name:
        cls = _DENOISER_CLASS.get(fam.name, cls)
    if cls and not out.config.get("auto_mapping"):
        out.config["auto_mapping"] = {"base_model_class": cls}
    return out


def add_component(adapter: Adapter, component: str) -> Adapter:
    """Prefix every module key that has no component with ``component`` (PEFT -> diffusers)."""
    mods = {}
    for k, m in adapter.modules.items():
        mods[k if adapter.split_key(k)[0] else f"{component}.{k}"] = m
    out = adapter.copy(modules=mods, component_prefix=True)
    out.extras = {k if out.split_key(k)[0] else f"{component}.{k}": t
                  for k, t in adapter.extras.items()}
    return out


_CLASS_COMPONENT = {
    "UNet2DConditionModel": "unet", "CLIPTextModel": "text_encoder",
    "CLIPTextModelWithProjection": "text_encoder_2", "SD3Transformer2DModel": "transformer",
    "FluxTransformer2DModel": "transformer", "T5EncoderModel": "text_encoder_3",
    "WanTransformer3DModel": "transformer", "HunyuanVideoTransformer3DModel": "transformer",
    "Lumina2Transformer2DModel": "transformer", "HiDreamImageTransformer2DModel": "transformer",
    "Flux2Transformer2DModel": "transformer", "ZImageTransformer2DModel": "transformer",
    "LTX2VideoTransformer3DModel": "transformer", "LTX2TextConnectors": "connectors",
    "Ideogram4Transformer2DModel": "transformer", "Krea2Transformer2DModel": "transformer",
    "AceStepTransformer1DModel": "transformer", "MiniMaxH3Transformer3DModel": "transformer",
    "Flux3Transformer2DModel": "transformer", "CosmosTransformer3DModel": "transformer",
    "AnimaTextConditioner": "text_conditioner",
}
_DENOISER_CLASS = {"flux1": "FluxTransformer2DModel", "sd3": "SD3Transformer2DModel",
                   "wan": "WanTransformer3DModel", "sdxl": "UNet2DConditionModel",
                   "sd15": "UNet2DConditionModel",
                   "hunyuanvideo": "HunyuanVideoTransformer3DModel",
                   "lumina2": "Lumina2Transformer2DModel",
                   "hidream": "HiDreamImageTransformer2DModel",
                   "flux2": "Flux2Transformer2DModel", "zimage": "ZImageTransformer2DModel",
                   "ltx2": "LTX2VideoTransformer3DModel",
                   "ideogram4": "Ideogram4Transformer2DModel", "krea2": "Krea2Transformer2DModel",
                   "acestep": "AceStepTransformer1DModel",
                   "minimaxh3": "MiniMaxH3Transformer3DModel",
                   "flux3": "Flux3Transformer2DModel", "anima": "CosmosTransformer3DModel"}


def infer_component(adapter: Adapter) -> str | None:
    """The diffusion component a PEFT adapter was made for: its config's auto_mapping, else the
    family its module names belong to."""
    mapping = adapter.config.get("auto_mapping") or {}
    cls = mapping.get("base_model_class") if isinstance(mapping, dict) else None
    if isinstance(cls, str):  # a config may hold anything here (a list is unhashable)
        if cls in _CLASS_COMPONENT:
            return _CLASS_COMPONENT[cls]
        if cls.endswith(("Transformer2DModel", "Transformer3DModel")):
            return "transformer"
    return None


def convert(adapter: Adapter, to: Format | str, component: str | None = None,
            family: Family | str | None = None) -> Adapter:
    """Re-key ``adapter`` for the target layout: components added or stripped, module paths moved
    to the layout's naming (fused <-> split, exactly).

    Example:
        >>> convert(load_adapter("unet_peft_dir"), "diffusers").components()   # doctest: +SKIP
        ['unet']
    """
    fmt = parse_format(to)
    if fmt in (Format.PEFT, Format.PEFTNATIVE):
        out, _ = to_layout(adapter, fmt, family)
        out = select_component(out, component)
        if out.components():
            raise OptionError(
                f"a PEFT folder holds one model but this adapter spans components "
                f"{out.components()}", path=adapter.source,
                hint="pick one with --component (e.g. --component unet)")
        return out
    comp = component or infer_component(adapter)
    if comp and not adapter.components():
        adapter = add_component(adapter, comp)
    elif component and adapter.components():
        adapter = select_component(adapter, component)
        adapter = add_component(adapter, component)
    elif not adapter.components() and not adapter.component_prefix:
        fam = _family_for(adapter, family)
        if fam is not None:  # a prefix-less file of a known family: its denoiser
            adapter = add_component(adapter, fam.denoiser.name)
    out, _ = to_layout(adapter, fmt, family)
    return out


__all__ = ["Format", "load_adapter", "save_adapter", "convert", "to_layout", "adapter_family",
           "ShapeMismatchError"]
