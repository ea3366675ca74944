"""What a model family is: the modules it has, under its diffusers names and its native names.

A :class:`Family` names its modules twice:

* the *diffusers* names (``transformer_blocks.0.attn.to_q``), one module per diffusers layer, the
  names diffusers, PEFT, ai-toolkit and SimpleTuner files use;
* the *native* names of the original checkpoint (BFL ``double_blocks.0.img_attn.qkv``, SAI
  ``joint_blocks.0.x_block.attn.qkv``, Wan ``blocks.0.self_attn.q``), used by kohya sd-scripts,
  musubi-tuner and ComfyUI files. A native layer may fuse several diffusers layers along its
  output rows (Flux ``qkv`` = ``to_q``, ``to_k``, ``to_v``): a :class:`Rule` says which, in which
  row proportions, and whether two halves are swapped (``adaLN_modulation`` shift/scale).

Paths here carry no component: the family's ``component`` (``transformer``, ``unet``) is what
adapter keys start with.

Example:
    >>> r = Rule("double_blocks.{i}.img_attn.qkv", ("transformer_blocks.{i}.attn.to_q",
    ...          "transformer_blocks.{i}.attn.to_k", "transformer_blocks.{i}.attn.to_v"))
    >>> r.match_native("double_blocks.3.img_attn.qkv")
    ['transformer_blocks.3.attn.to_q', 'transformer_blocks.3.attn.to_k', 'transformer_blocks.3.attn.to_v']
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Literal


def _template_regex(template: str, sep: str = ".") -> re.Pattern[str]:
    """``double_blocks.{i}.img_attn.qkv`` -> a regex with a named group for ``{i}``; with
    ``sep="_"`` the dots are kohya's underscores."""
    out = re.escape(template.replace(".", sep)).replace(r"\{i\}", r"(?P<i>\d+)")
    out = out.replace(r"\{rest\}", r"(?P<rest>.+)")
    return re.compile(f"^{out}$")


@dataclass(frozen=True)
class Rule:
    """One native module and the diffusers modules it stands for (its row blocks, in order).

    Fields:
        native: native path template (``{i}`` is the block index).
        parts: diffusers path templates, one per row block of the native output.
        ratios: relative sizes of the row blocks (``(1, 1, 1, 4)`` for Flux ``linear1``);
            ``None`` means equal blocks.
        swap: when the layer's output is twice its input, the native output is the diffusers
            one with its two halves swapped (BFL/SAI ``adaLN_modulation`` is ``(shift, scale)``,
            diffusers' ``AdaLayerNormContinuous`` is ``(scale, shift)``); a 6x modulation of the
            same name is not swapped (SD3's last ``context_block`` is 2x, the others 6x).
            ``"always"`` swaps the two halves whatever the proportions (MiniMax-H3's SwiGLU
            ``mlp.fc1`` is ``[gate; value]``, diffusers' ``ff.net.0.proj`` ``[value; gate]``).
    """

    native: str
    parts: tuple[str, ...]
    ratios: tuple[int, ...] | None = None
    swap: bool | Literal["always"] = False

    @cached_property
    def native_re(self) -> re.Pattern[str]:
        return _template_regex(self.native)

    @cached_property
    def kohya_re(self) -> re.Pattern[str]:
        return _template_regex(self.native, "_")

    @cached_property
    def part_res(self) -> tuple[re.Pattern[str], ...]:
        return tuple(_template_regex(p) for p in self.parts)

    @property
    def fused(self) -> bool:
        return len(self.parts) > 1

    @property
    def weights(self) -> tuple[int, ...]:
        return self.ratios or (1,) * len(self.parts)

    @staticmethod
    def _fill(template: str, m: re.Match, rest: str | None = None) -> str:
        if "{i}" in template:
            template = template.replace("{i}", m["i"])
        if "{rest}" in template:
            template = template.replace("{rest}", rest if rest is not None else m["rest"])
        return template

    def match_native(self, path: str) -> list[str] | None:
        """The diffusers paths of a native path, or None when the rule does not apply."""
        m = self.native_re.match(path)
        return [self._fill(p, m) for p in self.parts] if m else None

    def native_of_kohya(self, name: str) -> str | None:
        """The dotted native path of a kohya name (no prefix), or None. A ``{rest}`` tail is
        re-dotted with :func:`lorakit.naming.kohya_to_dotted`."""
        m = self.kohya_re.match(name)
        if not m:
            return None
        if "{rest}" in self.native:
            from lorakit.naming import kohya_to_dotted

            return self._fill(self.native, m, kohya_to_dotted(m["rest"]))
        return self._fill(self.native, m)

    def match_part(self, path: str) -> tuple[str, int] | None:
        """``(native path, row-block index)`` of a diffusers path, or None."""
        for j, rx in enumerate(self.part_res):
            if m := rx.match(path):
                return self._fill(self.native, m), j
        return None


@dataclass(frozen=True)
class BlockType:
    """A kind of repeated block, for coverage: ``double blocks 19/19``.

    Fields:
        label: what ``inspect`` prints (``double blocks``).
        prefix: diffusers path template of one block (``transformer_blocks.{i}``).
        count: how many the family's largest released model has (what a file may adapt).
        subs: the LoRA-able layers of one block, as paths below the block prefix.
        sizes: the block counts of the family's released models when they differ (SD 1.x's
            CLIP-L has 12 text-encoder layers, SD 2.x's OpenCLIP-H 23): coverage counts a file
            against the smallest that holds its highest block (:meth:`count_for`).
    """

    label: str
    prefix: str
    count: int
    subs: tuple[str, ...]
    head: str = ""  # optional regex before the prefix (CLIP's ``(?:text_model\.)?``)
    sizes: tuple[int, ...] = ()

    def count_for(self, indices) -> int:
        """The block count to report for a file adapting blocks ``indices``.

        Example:
            >>> bt = BlockType("layers", "layers.{i}", 23, (), sizes=(12, 23))
            >>> bt.count_for({0, 11}), bt.count_for({15}), bt.count_for(set())
            (12, 23, 12)
        """
        top = max(indices, default=-1)
        return next((n for n in sorted(self.sizes) if top < n), self.count)

    @cached_property
    def regex(self) -> re.Pattern[str]:
        body = re.escape(self.prefix).replace(r"\{i\}", r"(?P<i>\d+)")
        return re.compile(f"^{self.head}{body}\\.(?P<sub>.+)$")

    def index(self, path: str) -> tuple[int, str] | None:
        """``(block index, path below the block)`` of a diffusers path, or None."""
        m = self.regex.match(path)
        if not m:
            return None
        return (int(m["i"]) if "{i}" in self.prefix else 0), m["sub"]


@dataclass(frozen=True)
class Component:
    """A pipeline component of a family with the kohya prefix that spells it."""

    name: str  # diffusers pipeline attribute: transformer, unet, text_encoder, ...
    label: str  # for coverage: "transformer", "text encoder (CLIP-L)"
    kohya: str  # kohya prefix: lora_unet_, lora_te1_, ...
    known: tuple[str, ...] = ()  # regexes of the diffusers paths it has (no component)
    blocks: tuple[BlockType, ...] = ()
    # native <-> diffusers rules of a component other than the denoiser whose native names differ
    # (LTX-2's text connectors: ``aggregate_embed`` is ``text_proj_in``)
    rules: tuple[Rule, ...] = ()

    @cached_property
    def known_res(self) -> tuple[re.Pattern[str], ...]:
        return tuple(re.compile(f"^(?:{k})$") for k in self.known)

    def knows(self, path: str) -> bool:
        """A known diffusers path whose block index (if any) the released models have."""
        if not any(rx.match(path) for rx in self.known_res):
            return False
        for b in self.blocks:
            if (hit := b.index(path)) is not None:
                return hit[0] < b.count
        return True


@dataclass(frozen=True)
class Family:
    """A model family: its components, its native <-> diffusers names and its layouts.

    Fields:
        name: id used by ``--family`` and in metadata (``flux1``, ``sd3``, ``sdxl``...).
        title: human name.
        components: pipeline components, the denoiser first.
        rules: native <-> diffusers rules for the denoiser (empty when the names agree).
        namings: further spellings of the denoiser by rules (``{"xlabs": (...)}``).
        layouts: the layouts this family has (see :mod:`lorakit.formats.registry`).
        modelspec: ``modelspec.architecture`` written to kohya files.
        base_version: kohya ``ss_base_model_version``.
        markers: regexes over diffusers or native denoiser paths that identify the family.
        anti_markers: regexes no path of the family matches (a hit rules the family out).
        twin_of: a family whose names this one shares (HunyuanVideo's blocks are spelled as
            Flux.1's), or several (Ideogram 4's with Lumina 2 and Z-Image): a file the twin's
            markers claim is this family's when its metadata says so.
        extras: full (non-LoRA) tensors some of the family's files carry, as rules from their
            native name to their diffusers one (a Flux.1 control LoRA's norm scales,
            ``double_blocks.{i}.img_attn.norm.query_norm.scale`` = ``attn.norm_q.weight``).
        base_inputs: ``(diffusers path, input width)`` of base layers a LoRA may widen (a
            Flux.1 control LoRA's ``img_in`` takes 128 channels, the base ``x_embedder`` 64).
    """

    name: str
    title: str
    components: tuple[Component, ...]
    rules: tuple[Rule, ...] = ()
    namings: dict[str, tuple[Rule, ...]] = field(default_factory=dict)
    layouts: tuple[str, ...] = ()
    modelspec: str = ""
    base_version: str = ""
    markers: tuple[str, ...] = ()
    anti_markers: tuple[str, ...] = ()
    native_known: tuple[str, ...] = field(default=())  # native paths no rule covers (same names)
    twin_of: str | tuple[str, ...] = ""
    extras: tuple[Rule, ...] = ()
    base_inputs: tuple[tuple[str, int], ...] = ()

    @property
    def twins(self) -> tuple[str, ...]:
        """The families named by ``twin_of``."""
        return (self.twin_of,) if isinstance(self.twin_of, str) and self.twin_of else \
            tuple(self.twin_of or ())

    def extra_name(self, path: str, naming: str) -> str | None:
        """The name of a known extra tensor's denoiser ``path`` (either naming) in ``naming``
        (``native`` or ``diffusers``), or None when ``path`` is no known extra.

        Example:
            >>> from lorakit.formats.families import FLUX1
            >>> FLUX1.extra_name("single_blocks.3.norm.key_norm.scale", "diffusers")
            'single_transformer_blocks.3.attn.norm_k.weight'
        """
        for rule in self.extras:
            if (parts := rule.match_native(path)) is not None:
                return parts[0] if naming == "diffusers" else path
            if (hit := rule.match_part(path)) is not None:
                return path if naming == "diffusers" else hit[0]
        return None

    @property
    def denoiser(self) -> Component:
        return self.components[0]

    def component(self, name: str | None) -> Component | None:
        return next((c for c in self.components if c.name == name), None)

    def component_of_kohya(self, prefix: str) -> Component | None:
        return next((c for c in self.components if c.kohya == prefix), None)

    @cached_property
    def marker_res(self) -> tuple[re.Pattern[str], ...]:
        return tuple(re.compile(m) for m in self.markers)

    @cached_property
    def anti_res(self) -> tuple[re.Pattern[str], ...]:
        return tuple(re.compile(m) for m in self.anti_markers)

    def rules_for(self, naming: str) -> tuple[Rule, ...]:
        """The rules of a naming (``native`` or one of ``namings``)."""
        return self.rules if naming == "native" else self.namings.get(naming, ())

    def native_rule(self, path: str, naming: str = "native") -> tuple[Rule, list[str]] | None:
        for rule in self.rules_for(naming):
            if (parts := rule.match_native(path)) is not None:
                return rule, parts
        return None

    def part_rule(self, path: str, naming: str = "native") -> tuple[Rule, str, int] | None:
        for rule in self.rules_for(naming):
            if (hit := rule.match_part(path)) is not None:
                return rule, hit[0], hit[1]
        return None

    def is_native(self, path: str) -> bool:
        """Whether a denoiser path is a native name only (not a diffusers one)."""
        return self.native_rule(path) is not None and not self.denoiser.knows(path)

    def knows(self, component: str | None, path: str) -> bool:
        """Whether ``path`` names a module of ``component`` in either naming."""
        comp = self.component(component)
        if comp is None:
            return False
        if comp.knows(path):
            return True
        fam = self.view(comp.name)
        if fam is None:
            return False
        for naming in ("native", *fam.namings):  # a native name: its parts, block counts too
            if (hit := fam.native_rule(path, naming)) is not None:
                return all(comp.knows(p) for p in hit[1])
        return False

    @cached_property
    def _views(self) -> dict[str, Family]:
        out: dict[str, Family] = {self.denoiser.name: self}
        for c in self.components[1:]:
            if c.rules:
                out[c.name] = replace(self, components=(c,), rules=c.rules, namings={})
        return out

    def view(self, component: str | None) -> Family | None:
        """The family as the namings of ``component`` see it: itself for the denoiser (or no
        component), a family of that component alone with its :attr:`Component.rules` as native
        rules, or None for a component whose names are the same in every naming.

        Example:
            >>> fam = Family("x", "X", (Component("transformer", "t", "lora_unet_"),
            ...              Component("connectors", "c", "", rules=(Rule("a", ("b",)),))))
            >>> fam.view("connectors").native_rule("a")[1], fam.view("text_encoder")
            (['b'], None)
        """
        return self._views.get(component or self.denoiser.name)


def indexed(*names: str) -> str:
    """A regex alternation of literal paths (dots escaped; ``{i}`` = a block index)."""
    return "|".join(re.escape(n).replace(r"\{i\}", r"\d+") for n in names)


def under(block: str, *subs: str) -> tuple[str, ...]:
    """The paths ``subs`` below ``block`` (the targets of a native rule).

    Example:
        >>> under("transformer_blocks.{i}", "attn.to_q", "attn.to_k")
        ('transformer_blocks.{i}.attn.to_q', 'transformer_blocks.{i}.attn.to_k')
    """
    return tuple(f"{block}.{s}" for s in subs)
