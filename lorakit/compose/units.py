"""An adapter as a set of rank-one units per module (LoRA-LEGO's "minimal semantic units").

Unit ``j`` of a module is row ``j`` of A with column ``j`` of B. Its update is
``c * b_j a_j^T`` with ``c = weight * scale``; the coefficient is folded in symmetrically,
``a = sqrt|c| a_j`` and ``b = sign(c) sqrt|c| b_j``, so a module is exactly the sum of its units,
and concatenating units (of one or several adapters) is exactly their summed update (``cat``).

A set of units is a plain ``{module key: [Unit, ...]}`` dict (:data:`Units`). Every function
here returns a new one and never modifies its input:

* :func:`split` an adapter into units (``weight * scale`` folded in, float64);
* :func:`select` units by module regex, source adapter, norm, energy share or top-k per module;
* :func:`drop` units by name or predicate (the complement of ``select``);
* :func:`reorder` the units of each module (by norm, by origin, or any key);
* :func:`combine` several unit sets (module order and unit order kept: concatenation);
* :func:`assemble` units back into an :class:`~lorakit.adapter.Adapter`, one scale-1 module
  (``alpha = k``) per module holding exactly the sum of its units.

Identities (tested at relative 1e-6 on ``scale * B @ A``): ``assemble(split(a))`` has ``a``'s
updates; ``assemble(combine(split(a, w_a, 0), split(b, w_b, 1)))`` equals
``lorakit.merge([a, b], "cat", [w_a, w_b])`` (same factors); dropping units ``j >= k`` equals the
truncation ``scale * B[:, :k] @ A[:k]``, and on a resized adapter (SVD basis, one unit per
singular triplet) ``select(top=k)`` equals ``resize`` to rank ``k``.

``(a, b)``, ``(-a, -b)`` and ``(t a, b / t)`` are the same unit; :func:`canonical` picks one
representative: balanced ``|a| = |b|`` and the largest-magnitude entry of ``a`` positive.

Example ("keep the 4 strongest units of each module of adapter A plus all of B's units in the
attention layers")::

    >>> from lorakit.compose import assemble, combine, select, split
    >>> units = combine(select(split(a, source=0), top=4),                      # doctest: +SKIP
    ...                 select(split(b, source=1), module_regex=r"\\.attn\\."))
    >>> composed = assemble(units, like=a)                                      # doctest: +SKIP

A small runnable one:

    >>> import torch
    >>> from lorakit.adapter import Adapter, LoraModule
    >>> ad = Adapter(modules={"q": LoraModule(torch.eye(2, 3), torch.ones(4, 2), alpha=4)})
    >>> units = split(ad)["q"]
    >>> len(units), round(units[0].norm, 6)
    (2, 4.0)
    >>> torch.allclose(assemble({"q": units}, ad).modules["q"].delta(), ad.modules["q"].delta())
    True
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import torch

from lorakit.adapter import Adapter, LoraModule, ModuleKind
from lorakit.errors import OptionError, UnsupportedVariantError


@dataclass(frozen=True)
class Unit:
    """One rank-one unit: update ``outer(b, a)`` reshaped to the module's delta shape.

    Example:
        >>> import torch
        >>> u = Unit("q", 0, 0, torch.tensor([3.0, 0.0]), torch.tensor([0.0, 2.0]))
        >>> u.norm, u.delta().tolist()
        (6.0, [[0.0, 0.0], [6.0, 0.0]])
    """

    key: str  # module key
    source: int  # index of the adapter it came from
    index: int  # its rank index in that adapter's module
    a: torch.Tensor  # (in * kh * kw,) float64, coefficient folded in
    b: torch.Tensor  # (out,) float64, coefficient folded in
    kind: ModuleKind = ModuleKind.LINEAR
    down_shape: tuple[int, ...] = ()  # A's shape without the rank, e.g. (in,) or (in, kh, kw)
    dtype: torch.dtype | None = None  # the dtype of the module it came from

    @property
    def norm(self) -> float:
        """``||b a^T||_F = |a| |b|``."""
        return float(self.a.norm() * self.b.norm())

    @property
    def name(self) -> tuple[str, int, int]:
        """``(module key, source, index)``: what :func:`drop` takes."""
        return (self.key, self.source, self.index)

    def delta(self) -> torch.Tensor:
        """The update ``b a^T`` (float64), ``(out, in * kh * kw)``. For tests and small layers."""
        return torch.outer(self.b, self.a)


Units = dict[str, list[Unit]]
"""A set of units: ``{module key: [Unit, ...]}`` in module order."""


class UnitOrder(str, enum.Enum):
    """How :func:`reorder` sorts the units of each module."""

    NORM = "norm"  # strongest first
    ORIGIN = "origin"  # by (source, index): the order split() produced


def split(adapter: Adapter, weight: float = 1.0, source: int = 0) -> Units:
    """All units of ``adapter`` per module, ``weight * scale`` folded in (float64).

    ``source`` tags every unit with the adapter it came from (what ``select(sources=...)``
    filters on). DoRA modules (a magnitude vector normalises the whole update) and modules with
    a ``lora_B`` bias (not a rank-one term) are refused by name.

    Example:
        >>> import torch
        >>> from lorakit.adapter import Adapter, LoraModule
        >>> ad = Adapter(modules={"q": LoraModule(torch.ones(3, 2), torch.ones(4, 3), alpha=6)})
        >>> [round(u.norm, 6) for u in split(ad, weight=0.5)["q"]]
        [2.828427, 2.828427, 2.828427]
    """
    out: Units = {}
    for key, m in adapter.modules.items():
        if m.magnitude is not None:
            raise UnsupportedVariantError(
                "DoRA module: its magnitude vector normalises the whole update, which is not a "
                "sum of rank-one units", path=adapter.source, key=key,
                hint="merge the DoRA adapter into the base first")
        if m.bias is not None:
            raise UnsupportedVariantError(
                "module has a lora_B bias, which is not a rank-one unit", path=adapter.source,
                key=key)
        c = weight * m.scale
        root = math.sqrt(abs(c))
        a = m.down_matrix(torch.float64) * root  # (r, in*k)
        b = m.up_matrix(torch.float64) * math.copysign(root, c)  # (out, r)
        shape = tuple(m.down.shape[1:])
        out[key] = [Unit(key, source, j, a[j], b[:, j], m.kind, shape, m.dtype)
                    for j in range(m.rank)]
    return out


def canonical(u: Unit) -> Unit:
    """The balanced, sign-fixed representative of ``u`` (same update).

    Example:
        >>> import torch
        >>> c = canonical(Unit("q", 0, 0, torch.tensor([-4.0, 0.0]), torch.tensor([1.0])))
        >>> c.a.tolist(), c.b.tolist()
        ([2.0, -0.0], [-2.0])
    """
    na, nb = float(u.a.norm()), float(u.b.norm())
    if na == 0.0 or nb == 0.0:
        return replace(u, a=torch.zeros_like(u.a), b=torch.zeros_like(u.b))
    t = math.sqrt(nb / na)
    a, b = u.a * t, u.b / t  # |a| = |b| = sqrt(|a||b|)
    if float(a[int(a.abs().argmax())]) < 0:
        a, b = -a, -b
    return replace(u, a=a, b=b)


def _check_fraction(name: str, value: float | None, low_open: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not (0 < value <= 1 if low_open else 0 <= value <= 1):
        where = "(0, 1]" if low_open else "[0, 1]"
        raise OptionError(f"{name} must be a number in {where}, got {value!r}", key=name)


def _keep_energy(us: list[Unit], energy: float) -> list[Unit]:
    """The fewest strongest units whose ``sum norm^2`` reaches ``energy`` of the total."""
    ranked = sorted(us, key=lambda u: -u.norm)
    total = sum(u.norm ** 2 for u in ranked)
    if total == 0:
        return ranked[:1]
    kept, acc = [], 0.0
    for u in ranked:
        if acc >= energy * total * (1 - 1e-12):
            break
        kept.append(u)
        acc += u.norm ** 2
    return kept


def select(units: Units, *, top: int | None = None, energy: float | None = None,
           min_norm: float | None = None, min_share: float | None = None,
           module_regex: str | None = None, sources: Iterable[int] | None = None) -> Units:
    """Keep units; every criterion given must hold. Applied per module, in this order:

    1. ``module_regex``: the module key matches (``re.search``); other modules are dropped;
    2. ``sources``: the unit came from one of these adapters (the ``source`` of :func:`split`);
    3. ``min_norm``: ``||b a^T||_F >= min_norm``;
    4. ``min_share``: ``norm^2 / sum(norm^2)`` of the module's remaining units ``>= min_share``;
    5. ``energy``: the fewest strongest units whose ``sum norm^2`` reaches this fraction of the
       remaining units' total (the exact energy share of the update when the units are
       orthogonal, e.g. after a resize);
    6. ``top``: the ``top`` strongest units.

    ``energy`` and ``top`` return the kept units strongest first; the other criteria keep the
    input order. Modules left without units are omitted (a missing module contributes zero).

    Example:
        >>> import torch
        >>> from lorakit.adapter import Adapter, LoraModule
        >>> ad = Adapter(modules={"q": LoraModule(torch.diag(torch.tensor([1., 3., 2.])),
        ...                                       torch.eye(3), alpha=3)})
        >>> [u.index for u in select(split(ad), top=2)["q"]]
        [1, 2]
        >>> [u.index for u in select(split(ad), energy=0.9)["q"]]
        [1, 2]
    """
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise OptionError(f"top must be an integer >= 1, got {top!r}", key="top")
    _check_fraction("energy", energy, low_open=True)
    _check_fraction("min_share", min_share)
    if min_norm is not None and (isinstance(min_norm, bool) or
                                 not isinstance(min_norm, (int, float)) or min_norm < 0):
        raise OptionError(f"min_norm must be a number >= 0, got {min_norm!r}", key="min_norm")
    try:
        pattern = re.compile(module_regex) if module_regex else None
    except re.error as e:
        raise OptionError(f"module_regex {module_regex!r} is not a regular expression ({e})",
                          key="module_regex") from e
    keep_src = set(sources) if sources is not None else None
    out: Units = {}
    for key, us in units.items():
        if pattern and not pattern.search(key):
            continue
        us = [u for u in us if keep_src is None or u.source in keep_src]
        if min_norm is not None:
            us = [u for u in us if u.norm >= min_norm]
        if min_share is not None:
            total = sum(u.norm ** 2 for u in us)
            us = [u for u in us if total > 0 and u.norm ** 2 / total >= min_share]
        if energy is not None and us:
            us = _keep_energy(us, energy)
        if top is not None:
            us = sorted(us, key=lambda u: -u.norm)[:top]
        if us:
            out[key] = us
    return out


def drop(units: Units, keys: Iterable[tuple[str, int, int] | Unit] = (), *,
         where: Callable[[Unit], bool] | None = None) -> Units:
    """Remove units named by ``(module key, source, index)`` (or given as :class:`Unit`), and
    those for which ``where(unit)`` is true. Modules left empty are omitted.

    Example:
        >>> import torch
        >>> from lorakit.adapter import Adapter, LoraModule
        >>> ad = Adapter(modules={"q": LoraModule(torch.eye(3), torch.eye(3), alpha=3)})
        >>> [u.index for u in drop(split(ad), [("q", 0, 1)])["q"]]
        [0, 2]
        >>> [u.index for u in drop(split(ad), where=lambda u: u.index >= 1)["q"]]
        [0]
    """
    gone = {k.name if isinstance(k, Unit) else tuple(k) for k in keys}
    out: Units = {}
    for key, us in units.items():
        kept = [u for u in us if u.name not in gone and not (where is not None and where(u))]
        if kept:
            out[key] = kept
    return out


def reorder(units: Units, by: UnitOrder | str | Callable[[Unit], object] = UnitOrder.NORM,
            *, descending: bool | None = None) -> Units:
    """Sort the units of each module: by norm (strongest first), by origin (``source, index``)
    or by any key function (ascending unless ``descending``). The sum, hence the update, is
    unchanged; the order decides which rank index each unit gets in :func:`assemble`.

    Example:
        >>> import torch
        >>> from lorakit.adapter import Adapter, LoraModule
        >>> ad = Adapter(modules={"q": LoraModule(torch.diag(torch.tensor([1., 3., 2.])),
        ...                                       torch.eye(3), alpha=3)})
        >>> [u.index for u in reorder(split(ad))["q"]]
        [1, 2, 0]
        >>> [u.index for u in reorder(split(ad), lambda u: -u.index)["q"]]
        [2, 1, 0]
    """
    if callable(by) and not isinstance(by, str):
        key_fn, desc = by, bool(descending)
    else:
        try:
            order = UnitOrder(by)
        except ValueError as e:
            raise OptionError(f"unknown unit order {by!r} (use norm, origin or a key function)",
                              key="by") from e
        if order is UnitOrder.NORM:
            key_fn, desc = (lambda u: u.norm), (True if descending is None else descending)
        else:
            key_fn, desc = (lambda u: (u.source, u.index)), bool(descending)
    return {k: sorted(us, key=key_fn, reverse=desc) for k, us in units.items()}


def combine(*unit_sets: Units) -> Units:
    """Concatenate unit sets: modules in first-appearance order, each module's units in the
    order of the sets. Assembling the result gives the sum of the sets' updates (``cat``).

    Example:
        >>> import torch
        >>> from lorakit.adapter import Adapter, LoraModule
        >>> a = Adapter(modules={"q": LoraModule(torch.ones(1, 2), torch.ones(3, 1), alpha=1)})
        >>> b = Adapter(modules={"v": LoraModule(torch.ones(2, 2), torch.ones(3, 2), alpha=2)})
        >>> {k: len(us) for k, us in combine(split(a), split(b, source=1), split(a)).items()}
        {'q': 2, 'v': 2}
    """
    out: Units = {}
    for units in unit_sets:
        for key, us in units.items():
            out.setdefault(key, []).extend(us)
    return out


def count(units: Units) -> dict[str, int]:
    """Units per module (the ranks :func:`assemble` will give).

    Example:
        >>> import torch
        >>> from lorakit.adapter import Adapter, LoraModule
        >>> count(split(Adapter(modules={"q": LoraModule(torch.ones(2, 2), torch.ones(3, 2), 1)})))
        {'q': 2}
    """
    return {k: len(us) for k, us in units.items()}


def _check_compatible(units: Sequence[Unit]) -> None:
    first = units[0]
    for u in units[1:]:
        if (u.kind, u.down_shape, u.b.shape) != (first.kind, first.down_shape, first.b.shape):
            from lorakit.errors import IncompatibleAdaptersError

            raise IncompatibleAdaptersError(
                f"units of different shapes in one module: source {first.source} has "
                f"{first.kind.value} A {first.down_shape} / B {tuple(first.b.shape)}, source "
                f"{u.source} has {u.kind.value} A {u.down_shape} / B {tuple(u.b.shape)}",
                key=first.key)


def unit_module(units: Sequence[Unit], dtype: torch.dtype = torch.float32) -> LoraModule:
    """Stack units into one scale-1 module (``alpha = rank``): exactly their summed update.

    Example:
        >>> import torch
        >>> u = Unit("q", 0, 0, torch.tensor([1.0, 2.0]), torch.tensor([3.0]))
        >>> m = unit_module([u, u])
        >>> m.rank, m.alpha, m.delta().tolist()
        (2, 2.0, [[6.0, 12.0]])
    """
    _check_compatible(units)
    first = units[0]
    down = torch.stack([u.a for u in units]).to(dtype)  # (k, in*kh*kw)
    up = torch.stack([u.b for u in units], dim=1).to(dtype)  # (out, k)
    k = len(units)
    if first.kind is ModuleKind.CONV:
        down = down.reshape(k, *first.down_shape)
        up = up.reshape(up.shape[0], k, 1, 1)
    return LoraModule(down=down.contiguous(), up=up.contiguous(), alpha=float(k),
                      kind=first.kind)


def assemble(units: Units, like: Adapter | None = None, dtype: torch.dtype | None = None
             ) -> Adapter:
    """An adapter from units: one scale-1 module (``alpha = k``) per non-empty module, exactly
    the sum of its units' updates. Extras, base model, format and config come from ``like``
    (rank/alpha patterns dropped: the writers derive them from the new modules); the dtype is
    ``dtype``, else the dtype of ``like``'s module, else that of the units' source module.

    Example:
        >>> import torch
        >>> from lorakit.adapter import Adapter, LoraModule
        >>> ad = Adapter(modules={"q": LoraModule(torch.eye(2), torch.eye(2), alpha=4)})
        >>> out = assemble(split(ad))
        >>> m = out.modules["q"]
        >>> m.rank, m.alpha, round(m.delta()[0, 0].item(), 6)
        (2, 2.0, 2.0)
    """
    modules: dict[str, LoraModule] = {}
    for key, us in units.items():
        if not us:
            continue
        if dtype is not None:
            dt = dtype
        elif like is not None and key in like.modules:
            dt = like.modules[key].dtype
        else:
            dt = us[0].dtype or torch.float32
        modules[key] = unit_module(us, dt)
    if like is None:
        return Adapter(modules=modules)
    out = like.copy(modules=modules)
    out.metadata = {}
    out.config = {k: v for k, v in like.config.items()
                  if k not in ("rank_pattern", "alpha_pattern", "r", "lora_alpha")}
    return out


__all__ = ["Unit", "Units", "UnitOrder", "split", "canonical", "select", "drop", "reorder",
           "combine", "count", "unit_module", "assemble"]
