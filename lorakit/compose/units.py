"""An adapter as a set of rank-one units per module (LoRA-LEGO's "minimal semantic units").

Unit ``j`` of a module is row ``j`` of A with column ``j`` of B. Its update is
``c * b_j a_j^T`` with ``c = weight * scale``; the coefficient is folded in symmetrically,
``a = sqrt|c| a_j`` and ``b = sign(c) sqrt|c| b_j``, so a module is exactly the sum of its units,
and concatenating units (of one or several adapters) is exactly their summed update (``cat``).

``(a, b)``, ``(-a, -b)`` and ``(t a, b / t)`` are the same unit; :func:`canonical` picks one
representative: balanced ``|a| = |b|`` and the largest-magnitude entry of ``a`` positive.

Example:
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

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch

from lorakit.adapter import Adapter, LoraModule, ModuleKind


@dataclass(frozen=True)
class Unit:
    """One rank-one unit: update ``outer(b, a)`` reshaped to the module's delta shape."""

    key: str  # module key
    source: int  # index of the adapter it came from
    index: int  # its rank index in that adapter's module
    a: torch.Tensor  # (in * kh * kw,) float64, coefficient folded in
    b: torch.Tensor  # (out,) float64, coefficient folded in
    kind: ModuleKind = ModuleKind.LINEAR
    down_shape: tuple[int, ...] = ()  # A's shape without the rank, e.g. (in,) or (in, kh, kw)

    @property
    def norm(self) -> float:
        """``||b a^T||_F = |a| |b|``."""
        return float(self.a.norm() * self.b.norm())


def split(adapter: Adapter, weight: float = 1.0, source: int = 0) -> dict[str, list[Unit]]:
    """All units of ``adapter`` per module, ``weight * scale`` folded in (float64)."""
    out: dict[str, list[Unit]] = {}
    for key, m in adapter.modules.items():
        c = weight * m.scale
        root = math.sqrt(abs(c))
        a = m.down_matrix(torch.float64) * root  # (r, in*k)
        b = m.up_matrix(torch.float64) * math.copysign(root, c)  # (out, r)
        shape = tuple(m.down.shape[1:])
        out[key] = [Unit(key, source, j, a[j], b[:, j], m.kind, shape) for j in range(m.rank)]
    return out


def canonical(u: Unit) -> Unit:
    """The balanced, sign-fixed representative of ``u`` (same update)."""
    na, nb = float(u.a.norm()), float(u.b.norm())
    if na == 0.0 or nb == 0.0:
        return replace(u, a=torch.zeros_like(u.a), b=torch.zeros_like(u.b))
    t = math.sqrt(nb / na)
    a, b = u.a * t, u.b / t  # |a| = |b| = sqrt(|a||b|)
    if float(a[int(a.abs().argmax())]) < 0:
        a, b = -a, -b
    return replace(u, a=a, b=b)


def select(units: dict[str, list[Unit]], *, top: int | None = None,
           min_share: float | None = None, module_regex: str | None = None,
           sources: Iterable[int] | None = None) -> dict[str, list[Unit]]:
    """Keep units by module regex (``re.search``), source adapter, strongest ``top`` per module,
    and/or a minimal share of the module's energy (``norm^2 / sum norm^2``).

    Example:
        >>> select(split(ad), top=1)["q"][0].index   # doctest: +SKIP
        0
    """
    pattern = re.compile(module_regex) if module_regex else None
    keep_src = set(sources) if sources is not None else None
    out: dict[str, list[Unit]] = {}
    for key, us in units.items():
        if pattern and not pattern.search(key):
            continue
        us = [u for u in us if keep_src is None or u.source in keep_src]
        if min_share is not None:
            total = sum(u.norm ** 2 for u in us)
            us = [u for u in us if total > 0 and u.norm ** 2 / total >= min_share]
        if top is not None:
            us = sorted(us, key=lambda u: -u.norm)[:top]
        if us:
            out[key] = us
    return out


def drop(units: dict[str, list[Unit]], keys: Sequence[tuple[str, int, int]]
         ) -> dict[str, list[Unit]]:
    """Remove units named by ``(module key, source, index)``."""
    gone = set(keys)
    return {k: [u for u in us if (u.key, u.source, u.index) not in gone]
            for k, us in units.items()}


def unit_module(units: Sequence[Unit], dtype: torch.dtype = torch.float32) -> LoraModule:
    """Stack units into one scale-1 module (``alpha = rank``): exactly their summed update."""
    first = units[0]
    down = torch.stack([u.a for u in units]).to(dtype)  # (k, in*kh*kw)
    up = torch.stack([u.b for u in units], dim=1).to(dtype)  # (out, k)
    k = len(units)
    if first.kind is ModuleKind.CONV:
        down = down.reshape(k, *first.down_shape)
        up = up.reshape(up.shape[0], k, 1, 1)
    return LoraModule(down=down.contiguous(), up=up.contiguous(), alpha=float(k),
                      kind=first.kind)


def assemble(units: dict[str, list[Unit]], like: Adapter, dtype: torch.dtype | None = None
             ) -> Adapter:
    """An adapter from units per module (extras and config from ``like``)."""
    modules = {}
    for key, us in units.items():
        if not us:
            continue
        dt = dtype or (like.modules[key].dtype if key in like.modules else torch.float32)
        modules[key] = unit_module(us, dt)
    return like.copy(modules=modules)
