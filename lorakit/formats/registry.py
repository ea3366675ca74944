"""The one table of layouts and of which layouts each model family has.

A *layout* is how a file spells an adapter: its file kind (PEFT folder or one safetensors file),
its key spelling (``lora_A``/``lora_B`` under ``transformer.``, kohya ``lora_unet_..._qkv``,
``diffusion_model.`` + native names, XLabs processors) and the family naming its module paths use
(:mod:`lorakit.formats.rename`). A *family* (:mod:`lorakit.formats.families`) names the modules.

Example:
    >>> LAYOUTS["kohya"].naming_for("flux1")
    'native'
    >>> sorted(layouts_of("wan"))
    ['bfl', 'diffusers', 'kohya', 'peft']
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from lorakit.errors import OptionError


class Format(str, enum.Enum):
    """Layouts lorakit writes (``--to``); ``comfyui`` is another name for ``bfl``."""

    PEFT = "peft"
    DIFFUSERS = "diffusers"
    KOHYA = "kohya"
    BFL = "bfl"
    XLABS = "xlabs"
    AITOOLKIT = "aitoolkit"
    SIMPLETUNER = "simpletuner"
    FALKONTEXT = "falkontext"
    BFLCONTROL = "bflcontrol"
    PEFTNATIVE = "peftnative"


ALIASES = {"comfyui": "bfl", "ai-toolkit": "aitoolkit", "fal-kontext": "falkontext",
           "bfl-control": "bflcontrol", "peft-native": "peftnative"}
# layouts written as one .safetensors file (PEFT is a folder)
FILE_LAYOUTS = ("diffusers", "kohya", "bfl", "xlabs", "aitoolkit", "simpletuner", "comfyui",
                "falkontext", "bflcontrol")
LAYOUT_NAMES = tuple(f.value for f in Format) + tuple(ALIASES)


def parse_format(name: Format | str) -> Format:
    """The :class:`Format` for a layout name or alias, with a named error otherwise.

    Example:
        >>> parse_format("comfyui")
        <Format.BFL: 'bfl'>
    """
    if isinstance(name, Format):
        return name
    try:
        return Format(ALIASES.get(str(name).lower(), str(name).lower()))
    except ValueError:
        raise OptionError(f"unknown layout {name!r} (known: {', '.join(LAYOUT_NAMES)})") \
            from None


@dataclass(frozen=True)
class Layout:
    """One layout: what it writes and the family naming it needs.

    Fields:
        format: the layout's name.
        naming: the naming of module paths (``diffusers``, ``native``, ``xlabs``) or
            ``None`` to keep the adapter's own.
        native_families: families whose paths are written in native names (kohya: the
            families whose trainers write native names).
        description: one line for the README table.
    """

    format: Format
    naming: str | None
    native_families: tuple[str, ...] = ()
    description: str = ""

    def naming_for(self, family: str | None) -> str | None:
        if self.native_families:
            return "native" if family in self.native_families else None
        return self.naming


LAYOUTS: dict[str, Layout] = {
    "peft": Layout(Format.PEFT, "diffusers", description="PEFT folder (one model)"),
    "diffusers": Layout(Format.DIFFUSERS, "diffusers",
                        description="diffusers `save_lora_weights`: `transformer.`/`unet.` + "
                                    "`lora_A`/`lora_B`, `lora_adapter_metadata`"),
    "aitoolkit": Layout(Format.AITOOLKIT, "diffusers",
                        description="ostris ai-toolkit: diffusers keys, no alphas (scale folded)"),
    "simpletuner": Layout(Format.SIMPLETUNER, "diffusers",
                          description="SimpleTuner: diffusers keys and metadata"),
    "kohya": Layout(Format.KOHYA, None, native_families=("flux1", "sd3", "wan", "sdxl",
                                                            "hunyuanvideo", "flux2",
                                                            "minimaxh3"),
                    description="kohya sd-scripts / musubi-tuner: `lora_unet_` + native names, "
                                "fused qkv, `.alpha`"),
    "bfl": Layout(Format.BFL, "native",
                  description="BFL / ComfyUI: `diffusion_model.` + native names, `lora_down`/"
                              "`lora_up`/`.alpha`"),
    "xlabs": Layout(Format.XLABS, "xlabs",
                    description="XLabs: `double_blocks.N.processor.qkv_lora1.down.weight`"),
    "falkontext": Layout(Format.FALKONTEXT, "native",
                         description="fal Kontext trainer: `base_model.model.` + BFL names, "
                                     "`lora_A`/`lora_B`, no alphas (scale folded)"),
    "bflcontrol": Layout(Format.BFLCONTROL, "native",
                         description="BFL Flux.1 Canny/Depth control LoRA: bare BFL names, "
                                     "`lora_A`/`lora_B`/`lora_B.bias`, norm scales"),
    "peftnative": Layout(Format.PEFTNATIVE, "native",
                         description="a PEFT folder in the original checkpoint's names (ACE-Step "
                                     "1.5's trainer: `layers.0.self_attn.q_proj`)"),
}


# layouts whose files hold extra (non-LoRA) tensors: PEFT and diffusers keep any, bflcontrol a
# control LoRA's norm scales; the others refuse them by name
EXTRAS_LAYOUTS = ("peft", "diffusers", "aitoolkit", "simpletuner", "bflcontrol")


def layouts_of(family: str) -> tuple[str, ...]:
    """The layouts a family is read and written in (from the family table).

    Example:
        >>> "xlabs" in layouts_of("flux1")
        True
    """
    from lorakit.formats.families import get_family

    return get_family(family).layouts


def table() -> list[list[str]]:
    """Families x layouts, for the README and ``lorakit inspect --layouts``."""
    from lorakit.formats.families import FAMILIES

    head = ["family", *LAYOUTS]
    rows = [head]
    for fam in FAMILIES.values():
        rows.append([fam.title, *("yes" if name in fam.layouts else "-" for name in LAYOUTS)])
    return rows
