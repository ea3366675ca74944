"""Move an adapter between the namings of its family, exactly.

An adapter's module keys are ``<component>.<path>`` in one naming of its family: ``diffusers``
(one module per diffusers layer), ``native`` (the original checkpoint's layers, fused where the
checkpoint fuses them: what kohya, musubi-tuner and ComfyUI files hold) or ``xlabs`` (Flux
attention processors). Keys are kept in the naming of the file they were read from, so a kohya
Flux ``qkv`` module is resized as one module, as kohya does. :func:`to_naming` rewrites the keys
for another naming: native modules split into their diffusers parts (:func:`split_module`),
diffusers modules fuse into native ones (:func:`fuse_modules`); two modules that land on one layer
(a union of two namings) are added exactly.

Example:
    >>> import torch
    >>> from lorakit.adapter import Adapter, LoraModule
    >>> from lorakit.formats.families import FLUX1
    >>> m = LoraModule(torch.randn(4, 12), torch.randn(36, 4), alpha=4.0)
    >>> a = Adapter(modules={"transformer.double_blocks.0.img_attn.qkv": m}, component_prefix=True)
    >>> list(to_naming(a, FLUX1, "diffusers").modules)[0]
    'transformer.transformer_blocks.0.attn.to_q'
"""

from __future__ import annotations

from lorakit.adapter import Adapter, LoraModule
from lorakit.errors import ConfigMismatchError
from lorakit.formats.families.base import Family, Rule
from lorakit.formats.fuse import add_modules, fuse_modules, split_module

NAMINGS = ("diffusers", "native", "xlabs")


def _join(comp: str | None, path: str) -> str:
    return f"{comp}.{path}" if comp else path


def _is_denoiser(adapter: Adapter, family: Family, key: str) -> tuple[bool, str | None, str]:
    comp, path = adapter.split_key(key)
    return comp in (None, family.denoiser.name), comp, path


def _view(adapter: Adapter, family: Family, key: str) -> tuple[Family | None, str | None, str]:
    """The family as the key's component names it (:meth:`Family.view`: the denoiser, or a
    component with native rules of its own), its component and path."""
    comp, path = adapter.split_key(key)
    return family.view(comp), comp, path


def naming_of(adapter: Adapter, family: Family) -> str:
    """``diffusers``, ``native`` or ``xlabs``: the naming most denoiser modules use (diffusers when
    the family's names agree, or no module says otherwise).

    Example:
        >>> from lorakit.formats.families import WAN
        >>> naming_of(Adapter(modules={"transformer.blocks.0.self_attn.q": None},
        ...                   component_prefix=True), WAN)
        'native'
    """
    counts = dict.fromkeys(NAMINGS, 0)
    for key in adapter.modules:
        den, _, path = _is_denoiser(adapter, family, key)
        if not den:
            continue
        if family.denoiser.knows(path):
            counts["diffusers"] += 1
            continue
        for naming in ("native", *family.namings):
            if family.native_rule(path, naming) is not None:
                counts[naming] += 1
                break
    best = max(counts.values())
    return "diffusers" if counts["diffusers"] == best else max(counts, key=counts.__getitem__)


def _moves(adapter: Adapter, family: Family, key: str, naming: str) -> bool:
    """Whether the module at ``key`` is not spelled in ``naming`` yet."""
    fam, _, path = _view(adapter, family, key)
    if fam is None:
        return False
    if fam.denoiser.knows(path):  # a diffusers name
        return naming != "diffusers" and fam.part_rule(path, naming) is not None
    others = [n for n in ("native", *fam.namings) if n != naming]
    return any(fam.native_rule(path, n) is not None for n in others)


def _split_all(adapter: Adapter, family: Family) -> dict[str, list[LoraModule]]:
    out: dict[str, list[LoraModule]] = {}
    for key, m in adapter.modules.items():
        fam, comp, path = _view(adapter, family, key)
        hit = None
        if fam is not None and not fam.denoiser.knows(path):
            for naming in ("native", *fam.namings):
                if (hit := fam.native_rule(path, naming)) is not None:
                    break
        if hit is None:
            out.setdefault(key, []).append(m)
            continue
        rule, paths = hit
        for p, part in zip(paths, split_module(m, rule.weights, swap=rule.swap, key=key),
                           strict=True):
            if part is not None:
                out.setdefault(_join(comp, p), []).append(part)
    return out


def to_naming(adapter: Adapter, family: Family, naming: str) -> Adapter:
    """``adapter`` with its denoiser keys in ``naming`` (updates unchanged, exactly).

    A diffusers module that ``naming`` cannot spell (the XLabs layout has no ``proj_mlp``) is an
    error naming it.
    """
    if naming not in NAMINGS:
        raise ConfigMismatchError(f"unknown naming {naming!r} (known: {', '.join(NAMINGS)})")
    extras = _extras_in(adapter, family, naming)
    if not any(_moves(adapter, family, k, naming) for k in adapter.modules):
        # already in that naming: nothing is copied
        return adapter if extras is adapter.extras else adapter.copy(extras=extras)
    split = {k: add_modules(ms, key=k) for k, ms in _split_all(adapter, family).items()}
    if naming == "diffusers" or not family.rules_for(naming):
        return adapter.copy(modules=split, extras=extras)
    groups: dict[str, tuple[Rule, dict[int, LoraModule]]] = {}
    out: dict[str, LoraModule] = {}
    for key, m in split.items():
        fam, comp, path = _view(adapter, family, key)
        hit = fam.part_rule(path, naming) if fam is not None else None
        if hit is None:
            if fam is not None and fam.denoiser.knows(path):
                raise ConfigMismatchError(f"the {naming} naming of {family.title} has no layer "
                                          f"for this module", key=key)
            out[key] = m
            continue
        rule, native, j = hit
        nkey = _join(comp, native)
        groups.setdefault(nkey, (rule, {}))[1][j] = m
        out.setdefault(nkey, m)  # placeholder keeps the first part's position
    for nkey, (rule, parts) in groups.items():
        ordered = [parts.get(j) for j in range(len(rule.parts))]
        out[nkey] = fuse_modules(ordered, rule.weights, swap=rule.swap, key=nkey)
    return adapter.copy(modules=out, extras=extras)


def _extras_in(adapter: Adapter, family: Family, naming: str) -> dict:
    """The adapter's extras with the family's known ones (norm scales) renamed for ``naming``
    (``native`` or ``diffusers``; other namings keep them as they are); the same dict when
    nothing moves."""
    if naming not in ("native", "diffusers") or not family.extras or not adapter.extras:
        return adapter.extras
    out, moved = {}, False
    for key, t in adapter.extras.items():
        den, comp, path = _is_denoiser(adapter, family, key)
        name = family.extra_name(path, naming) if den else None
        new = _join(comp, name) if name else key
        moved |= new != key
        out[new] = t
    return out if moved else adapter.extras


def align(adapters: list[Adapter]) -> list[Adapter]:
    """The adapters in one naming, so that modules of the same layer share a key: adapters of one
    family whose namings differ (a kohya Flux file and a diffusers one), or of which some hold a
    module only a native name spells and others none (an LTX-2 ComfyUI file's ``patchify_proj``
    among block names both spell alike, and a diffusers one), all move to the diffusers naming;
    anything else is returned as is. For merges of files from different trainers.

    Example:
        >>> align([]) == []
        True
    """
    from lorakit.formats import adapter_family

    fams = {f.name: f for a in adapters if (f := adapter_family(a)) is not None}
    if len(fams) != 1:  # none known, or several: nothing to align
        return list(adapters)
    fam = next(iter(fams.values()))  # an undecided one (shared names) is taken to be the same
    namings = {naming_of(a, fam) for a in adapters}
    native_only = {any(_moves(a, fam, k, "diffusers") for k in a.modules) for a in adapters}
    if len(namings) == 1 and len(native_only) == 1:
        return list(adapters)
    return [to_naming(a, fam, "diffusers") for a in adapters]
