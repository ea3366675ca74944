"""Which format and layout a path holds, decided from the files and the tensor keys alone.

Example:
    >>> detect_format("../shared/real_adapters/gpt2_r4_jhess")   # doctest: +SKIP
    ('peft', 'peft')
"""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import ConfigMismatchError, InputNotFoundError, UnknownLayoutError
from lorakit.formats import diffsynth, diffusers, kohya, lycoris, prefixed
from lorakit.formats.common import check_variants
from lorakit.formats.peft import CONFIG_NAME
from lorakit.formats.positional import refuse_positional

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def classify_keys(keys: list[str], path: Path | str) -> tuple[str, str]:
    """``(format, layout)`` for a weights file's keys (no config beside it)."""
    if not keys:
        raise InputNotFoundError("weights file holds no tensors", path=path)
    if layout := lycoris.classify(keys, path):  # hook (issue 16b): LyCORIS in kohya names
        return "kohya", layout
    refuse_positional(keys, path)  # hook (issue 16b): numbered, unnamed pairs are refused by name
    if prefixed.is_prefixed_lycoris(keys):
        return "bfl", "bfl"  # LoKr/LoHa under diffusion_model. (ai-toolkit's Z-Image, Flux.2)
    check_variants(keys, path)  # LoHa/LoKr/OFT/... are named even when no LoRA key is present
    if layout := kohya.classify(keys):
        return "kohya", layout
    if layout := prefixed.classify(keys):
        return prefixed.FORMAT_OF.get(layout, layout), layout
    if any(k.startswith("base_model.model.") for k in keys):
        raise ConfigMismatchError(
            f"PEFT weights without {CONFIG_NAME} beside them (ranks and alphas are unknown)",
            path=path, hint=f"put the adapter's {CONFIG_NAME} next to the weights")
    if layout := diffusers.classify(keys):
        return "diffusers", layout
    if layout := diffsynth.classify(keys):
        return "diffusers", layout
    sample = ", ".join(sorted(keys)[:3])
    raise UnknownLayoutError(f"keys match no LoRA layout lorakit knows (e.g. {sample})",
                             path=path, key=sorted(keys)[0])


def weights_in_folder(folder: Path) -> Path:
    """The single weights file of a non-PEFT folder (diffusers or kohya)."""
    preferred = folder / diffusers.WEIGHT_NAME
    if preferred.is_file():
        return preferred
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix in WEIGHT_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise InputNotFoundError("folder holds no adapter files "
                                 f"({CONFIG_NAME} or *.safetensors)", path=folder)
    safes = [p for p in files if p.suffix == ".safetensors"]
    pick = safes or files
    if len(pick) > 1:
        names = ", ".join(p.name for p in pick[:4])
        raise InputNotFoundError(f"folder holds several weights files ({names}); name one",
                                 path=folder)
    return pick[0]


def detect_format(path: str | Path) -> tuple[str, str]:
    """``(format, layout)`` of an adapter path. Reads only the header / keys."""
    from lorakit.io import read_pickle, read_safetensors_header

    path = Path(path)
    if not path.exists():
        raise InputNotFoundError("no such file or folder", path=path)
    if path.is_dir():
        if (path / CONFIG_NAME).is_file():
            return "peft", "peft"
        path = weights_in_folder(path)
    elif (path.parent / CONFIG_NAME).is_file() and path.name.startswith("adapter_model"):
        return "peft", "peft"
    if path.suffix == ".safetensors":
        header, _ = read_safetensors_header(path)
        return classify_keys(list(header), path)
    return classify_keys(list(read_pickle(path)), path)
