"""Model families: which modules a family has and how its native checkpoint names them.

``FAMILIES`` is the one table of families; each lists the layouts it is read and written in
(:mod:`lorakit.formats.registry` has the layouts). :func:`detect_family` picks the family of a set
of module paths from their names (markers), then metadata, then layer shapes.

Example:
    >>> detect_family(["transformer.single_transformer_blocks.7.proj_out"]).name
    'flux1'
    >>> detect_family(["model.layers.0.self_attn.q_proj"]) is None
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from lorakit.formats.families.acestep import ACESTEP, has_acestep_native_names
from lorakit.formats.families.anima import ANIMA
from lorakit.formats.families.base import BlockType, Component, Family, Rule
from lorakit.formats.families.flux import FLUX1
from lorakit.formats.families.flux2 import FLUX2, has_flux2_proportions
from lorakit.formats.families.flux3 import FLUX3
from lorakit.formats.families.hidream import HIDREAM
from lorakit.formats.families.hunyuan import HUNYUAN_VIDEO
from lorakit.formats.families.ideogram4 import IDEOGRAM4, has_ideogram4_width
from lorakit.formats.families.krea2 import KREA2, has_krea2_gqa
from lorakit.formats.families.ltx2 import LTX2
from lorakit.formats.families.lumina import LUMINA2
from lorakit.formats.families.minimax import MINIMAX_H3
from lorakit.formats.families.others import LTX_VIDEO, QWEN_IMAGE
from lorakit.formats.families.sd import SD15, SDXL
from lorakit.formats.families.sd3 import SD3
from lorakit.formats.families.wan import WAN
from lorakit.formats.families.zimage import ZIMAGE, has_zimage_proportions
from lorakit.naming import split_component

FAMILIES: dict[str, Family] = {f.name: f for f in (FLUX1, SD3, SDXL, SD15, WAN, QWEN_IMAGE,
                                                    LTX_VIDEO, HUNYUAN_VIDEO, LUMINA2, HIDREAM,
                                                    FLUX2, ZIMAGE, LTX2, IDEOGRAM4, KREA2,
                                                    ACESTEP, MINIMAX_H3, FLUX3, ANIMA)}

# metadata values that name a family (kohya ss_base_model_version, modelspec.architecture)
_META_HINTS = (("qwen", "qwenimage"), ("ltx-2", "ltx2"), ("ltx2", "ltx2"), ("ltx_2", "ltx2"),
               ("ltx", "ltxvideo"), ("hunyuan", "hunyuanvideo"),
               ("z-image", "zimage"), ("zimage", "zimage"), ("z_image", "zimage"),
               ("lumina", "lumina2"), ("hidream", "hidream"), ("flux-2", "flux2"),
               ("flux2", "flux2"), ("flux.2", "flux2"), ("flux-3", "flux3"),
               ("flux3", "flux3"), ("flux.3", "flux3"), ("flux", "flux1"),
               ("stable-diffusion-v3", "sd3"), ("sd3", "sd3"),
               ("sdxl", "sdxl"), ("-xl-", "sdxl"), ("wan", "wan"), ("sd_v1", "sd15"),
               ("sd_v2", "sd15"), ("stable-diffusion-v1", "sd15"), ("stable-diffusion-v2", "sd15"),
               ("ideogram", "ideogram4"), ("krea2", "krea2"), ("krea-2", "krea2"),
               ("krea_2", "krea2"),
               ("ace-step", "acestep"), ("ace_step", "acestep"), ("acestep", "acestep"),
               ("minimax-h3", "minimaxh3"), ("minimax_h3", "minimaxh3"), ("anima", "anima"))


def get_family(name: str) -> Family:
    """The family called ``name`` (``flux1``, ``sd3``, ``sdxl``, ``sd15``, ``wan``,
    ``qwenimage``, ``ltxvideo``, ``hunyuanvideo``, ``lumina2``, ``hidream``, ``flux2``, ``zimage``,
    ``ltx2``, ``ideogram4``, ``krea2``, ``acestep``, ``minimaxh3``, ``flux3``, ``anima``).

    Example:
        >>> get_family("wan").title
        'Wan 2.x'
    """
    from lorakit.errors import OptionError

    try:
        return FAMILIES[name]
    except KeyError:
        raise OptionError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})") \
            from None


def _scores(paths: list[str]) -> dict[str, int]:
    scores: dict[str, int] = {}
    for fam in FAMILIES.values():
        if any(rx.search(p) for p in paths for rx in fam.anti_res):
            continue
        n = sum(1 for p in paths if any(rx.search(p) for rx in fam.marker_res))
        if n:
            scores[fam.name] = n
    return scores


def _from_metadata(meta: Mapping[str, str]) -> str | None:
    if meta.get("lorakit.family") in FAMILIES:
        return meta["lorakit.family"]
    for key in ("modelspec.architecture", "ss_base_model_version"):
        value = str(meta.get(key, "")).lower()
        for needle, fam in _META_HINTS:
            if needle in value:
                return fam
    return None


def _from_shapes(denoiser: list[str], shapes: Mapping[str, tuple[int, int]]) -> str | None:
    """Flux.1 and SD3 share the diffusers names of their double blocks: hidden 3072 is Flux.1
    (SD3 is 1536, SD3.5 large 2432); a 2048-wide cross-attention key is SDXL, 768 SD 1.x; a block
    ``to_k`` narrower than its input is Krea 2's (grouped-query attention)."""
    if has_krea2_gqa(denoiser, shapes):
        return "krea2"
    for p in denoiser:
        io = shapes.get(p)
        if io is None:
            continue
        if p.endswith("attn.to_q") and p.startswith("transformer_blocks."):
            return {3072: "flux1", 1536: "sd3", 2432: "sd3"}.get(io[1])
        if p.endswith("attn2.to_k"):
            return {2048: "sdxl", 768: "sd15", 1024: "sd15"}.get(io[1])
    return None


def _shape_twin(top: str, denoiser: list[str], shapes: Mapping[str, tuple[int, int]],
                component_prefix: bool) -> Family | None:
    """The family whose shapes a file of names it shares with ``top`` has: Flux.2's BFL names
    are Flux.1's (its proportions are not), Z-Image's original names are Lumina 2's (its qkv
    is 3 x its input), Ideogram 4's are both's (its attention is 4608 wide)."""
    tests = {"flux1": ((FLUX2, has_flux2_proportions),),
             "lumina2": ((IDEOGRAM4, has_ideogram4_width), (ZIMAGE, has_zimage_proportions)),
             "zimage": ((IDEOGRAM4, has_ideogram4_width),)}.get(top, ())
    plain = {split_component(k)[1] if component_prefix else k: v for k, v in shapes.items()}
    return next((twin for twin, test in tests if test(denoiser, plain)), None)


_SHARED_COMPONENTS = {"transformer", "unet", "text_encoder", "text_encoder_2", "text_encoder_3"}


def _own_component(comps: set[str | None]) -> Family | None:
    """The family of a component no other family has (Anima's ``text_conditioner``)."""
    for fam in FAMILIES.values():
        if comps & ({c.name for c in fam.components} - _SHARED_COMPONENTS):
            return fam
    return None


def detect_family(keys: Iterable[str], metadata: Mapping[str, str] | None = None,
                  shapes: Mapping[str, tuple[int, int]] | None = None,
                  component_prefix: bool = True) -> Family | None:
    """The family of adapter module keys (``transformer.x.y`` or unprefixed), or None (LLMs and
    models no family describes).

    Names decide first (the family with the most marker hits; SDXL over SD 1.x when a second text
    encoder is present), then ``metadata`` (``lorakit.family``, ``modelspec.architecture``,
    ``ss_base_model_version``), then ``shapes`` (``{key: (out, in)}``) for names two families
    share (Flux.2's proportions on the BFL names it shares with Flux.1).

    Example:
        >>> detect_family(["transformer.blocks.0.attn1.to_q"]).name
        'wan'
    """
    keys = list(keys)
    comps = set()
    paths = []
    for k in keys:
        comp, rest = split_component(k) if component_prefix else (None, k)
        comps.add(comp)
        paths.append(rest)
    if own := _own_component(comps):
        return own  # a component only one family has (Anima's text_conditioner)
    if comps and comps <= {"text_encoder", "text_encoder_2", "text_encoder_3"} or not paths:
        hint = _from_metadata(metadata or {})
        sdxl_te = (metadata or {}).get("lorakit.kohya_te_prefix") == "lora_te1_"
        if ("text_encoder_2" in comps or sdxl_te) and hint not in ("sd3", "flux1"):
            return SDXL
        return FAMILIES.get(hint) if hint else None
    denoiser = [p for k, p in zip(keys, paths, strict=True)
                if not (component_prefix and split_component(k)[0] in
                        ("text_encoder", "text_encoder_2", "text_encoder_3"))]
    scores = _scores(denoiser)
    if "sdxl" in scores and "sd15" in scores:
        scores.pop("sd15" if "text_encoder_2" in comps else "sdxl"
                   if scores["sd15"] > scores["sdxl"] else "sd15")
    if scores:
        best = max(scores.values())
        top = [n for n, s in scores.items() if s == best]
        if len(top) == 1:
            if top[0] == "sd15" and "text_encoder_2" in comps:
                return SDXL  # SD 1.x has one text encoder
            hint = _from_metadata(metadata or {})
            if hint and top[0] in FAMILIES[hint].twins:
                return FAMILIES[hint]  # names a twin shares (HunyuanVideo's Flux-like blocks)
            if shapes and (twin := _shape_twin(top[0], denoiser, shapes, component_prefix)):
                return twin
            return FAMILIES[top[0]]
    return _without_markers(denoiser, comps, metadata or {}, shapes, component_prefix)


def _without_markers(denoiser: list[str], comps: set, metadata: Mapping[str, str],
                     shapes: Mapping[str, tuple[int, int]] | None,
                     component_prefix: bool) -> Family | None:
    """The family of denoiser paths no marker settles: metadata, ACE-Step's original names,
    shapes, then the UNet's names (Flux.1 or SD3 double blocks alone stay undecided)."""
    hint = _from_metadata(metadata)
    if hint is None and has_acestep_native_names(denoiser):
        return ACESTEP  # the original names only when no LLM spells them so
    if hint is None and shapes:
        plain = {split_component(k)[1] if component_prefix else k: v for k, v in shapes.items()}
        hint = _from_shapes(denoiser, plain)
    if hint:
        return FAMILIES[hint]
    if any(p.startswith(("down_blocks.", "up_blocks.", "mid_block.")) for p in denoiser):
        sdxl_te = metadata.get("lorakit.kohya_te_prefix") == "lora_te1_"
        return SDXL if "text_encoder_2" in comps or sdxl_te else SD15
    return None


__all__ = ["FAMILIES", "Family", "Component", "BlockType", "Rule", "detect_family",
           "get_family", "FLUX1", "SD3", "SDXL", "SD15", "WAN", "QWEN_IMAGE", "LTX_VIDEO",
           "HUNYUAN_VIDEO", "LUMINA2", "HIDREAM", "FLUX2", "ZIMAGE", "LTX2", "IDEOGRAM4", "KREA2",
           "ACESTEP", "MINIMAX_H3", "FLUX3", "ANIMA"]
