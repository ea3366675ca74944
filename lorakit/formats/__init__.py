"""Load and save adapters in PEFT, diffusers and kohya formats, with auto-detection.

Example:
    >>> from lorakit.formats import load_adapter, save_adapter          # doctest: +SKIP
    >>> a = load_adapter("../shared/real_adapters/sd15_kohyalike_timohavdk")  # doctest: +SKIP
    >>> save_adapter(a, "out.safetensors", "diffusers")                  # doctest: +SKIP
"""

from __future__ import annotations

import enum
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


class Format(str, enum.Enum):
    """On-disk adapter formats lorakit reads and writes."""

    PEFT = "peft"
    DIFFUSERS = "diffusers"
    KOHYA = "kohya"


def load_adapter(path: str | Path, format: Format | str | None = None) -> Adapter:
    """Load an adapter from a PEFT folder, a diffusers or kohya file, a folder holding one, or an
    ``hf://org/repo[@revision][/subfolder]`` Hub source (fetched into the shared HF cache).

    Any failure is a :class:`~lorakit.errors.LorakitError` naming the file, key and problem.

    Example:
        >>> a = load_adapter("../shared/real_adapters/gpt2_r4_jhess")   # doctest: +SKIP
        >>> a.source_format, len(a.modules)                              # doctest: +SKIP
        ('peft', 36)
    """
    if isinstance(path, str) and path.startswith("hf://"):  # a Hub source (lorakit.sources)
        from lorakit.sources import load_source

        return load_source(path, format)
    path = Path(path)
    try:
        return _load(path, Format(format) if format else None)
    except LorakitError:
        raise
    except (ValueError, IndexError, RuntimeError, KeyError, TypeError, OverflowError) as e:
        # Defensive: malformed content that slipped past the checks must still be named.
        raise CorruptFileError(f"unreadable adapter content ({type(e).__name__}: {e})",
                               path=path) from e


def _load(path: Path, fmt: Format | None) -> Adapter:
    from lorakit.formats import diffusers, kohya
    from lorakit.formats.detect import detect_format, weights_in_folder
    from lorakit.formats.peft import load_peft
    from lorakit.io import read_pickle, read_safetensors

    detected, layout = detect_format(path)
    if fmt is not None and fmt.value != detected:
        raise ConfigMismatchError(f"asked to read it as {fmt.value} but it is {detected} "
                                  f"({layout})", path=path)
    if detected == "peft":
        return load_peft(path)
    file = weights_in_folder(path) if path.is_dir() else path
    if file.suffix == ".safetensors":
        tensors, meta = read_safetensors(file)
    else:
        tensors, meta = read_pickle(file), {}
    if detected == "kohya":
        return kohya.load_kohya(file, tensors, meta, layout)
    return diffusers.load_diffusers(file, tensors, meta, layout)


def default_output_name(fmt: Format) -> str | None:
    """File name used when the output of a file format is given as a folder."""
    return {Format.DIFFUSERS: "pytorch_lora_weights.safetensors",
            Format.KOHYA: "lora.safetensors"}.get(fmt)


def save_adapter(adapter: Adapter, out: str | Path, format: Format | str | None = None, *,
                 force: bool = False, dtype: torch.dtype | None = None,
                 provenance: dict[str, Any] | None = None) -> Path:
    """Write ``adapter`` atomically; ``format`` defaults to the one it was read from (else PEFT).

    PEFT output is a folder. diffusers/kohya output is a ``.safetensors`` file; if ``out`` has no
    ``.safetensors`` suffix it is a folder holding ``pytorch_lora_weights.safetensors`` (diffusers)
    or ``lora.safetensors`` (kohya). Returns the path written.

    Example:
        >>> save_adapter(a, "out_dir", "peft", force=True)   # doctest: +SKIP
    """
    from lorakit.formats.diffusers import save_diffusers
    from lorakit.formats.kohya import save_kohya
    from lorakit.formats.peft import save_peft
    from lorakit.io import atomic_output

    fmt = Format(format or adapter.source_format or "peft")
    adapter.validate()
    out = Path(out)
    if fmt is Format.PEFT:
        with atomic_output(out, force=force, is_dir=True) as tmp:
            save_peft(adapter, tmp, dtype=dtype, provenance=provenance)
        return out
    writer = save_diffusers if fmt is Format.DIFFUSERS else save_kohya
    if out.suffix != ".safetensors":
        folder = out
        out = folder / str(default_output_name(fmt))
        with atomic_output(folder, force=force, is_dir=True) as tmp:
            writer(adapter, tmp / out.name, dtype=dtype, provenance=provenance)
        return out
    with atomic_output(out, force=force) as tmp:
        writer(adapter, tmp, dtype=dtype, provenance=provenance)
    return out


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
    out = adapter.copy(modules=mods, component_prefix=False)
    cls = next((c for c, comp in _CLASS_COMPONENT.items() if comp == component), None)
    if cls and not out.config.get("auto_mapping"):
        out.config["auto_mapping"] = {"base_model_class": cls}
    return out


def add_component(adapter: Adapter, component: str) -> Adapter:
    """Prefix every module key that has no component with ``component`` (PEFT -> diffusers)."""
    mods = {}
    for k, m in adapter.modules.items():
        mods[k if adapter.split_key(k)[0] else f"{component}.{k}"] = m
    return adapter.copy(modules=mods, component_prefix=True)


_CLASS_COMPONENT = {
    "UNet2DConditionModel": "unet", "CLIPTextModel": "text_encoder",
    "CLIPTextModelWithProjection": "text_encoder_2", "SD3Transformer2DModel": "transformer",
    "FluxTransformer2DModel": "transformer", "T5EncoderModel": "text_encoder_3",
}


def infer_component(adapter: Adapter) -> str | None:
    """The diffusion component a PEFT adapter was made for, from its config's auto_mapping."""
    mapping = adapter.config.get("auto_mapping") or {}
    cls = mapping.get("base_model_class") if isinstance(mapping, dict) else None
    if not isinstance(cls, str):  # a config may hold anything here (a list is unhashable)
        return None
    if cls in _CLASS_COMPONENT:
        return _CLASS_COMPONENT[cls]
    if cls and cls.endswith("Transformer2DModel"):
        return "transformer"
    return None


def convert(adapter: Adapter, to: Format | str, component: str | None = None) -> Adapter:
    """Re-key ``adapter`` for the target format (components added or stripped); tensors untouched.

    Example:
        >>> convert(load_adapter("unet_peft_dir"), "diffusers").components()   # doctest: +SKIP
        ['unet']
    """
    fmt = Format(to)
    if fmt is Format.PEFT:
        out = select_component(adapter, component)
        if out.components():
            raise OptionError(
                f"a PEFT folder holds one model but this adapter spans components "
                f"{out.components()}", path=adapter.source,
                hint="pick one with --component (e.g. --component unet)")
        return out
    comp = component or infer_component(adapter)
    if comp and not adapter.components():
        return add_component(adapter, comp)
    if component and adapter.components():
        return select_component(adapter, component)
    return adapter


__all__ = ["Format", "load_adapter", "save_adapter", "convert", "ShapeMismatchError"]
