"""Line several adapters up module by module before a merge.

Heterogeneous inputs are the normal case: different ranks, alphas, rsLoRA, per-module patterns and
target-module sets. The merged module set is the union (a module missing from an adapter
contributes zero) or, with ``intersect``, only the modules every adapter has. Extras (heads,
modules_to_save) follow :class:`ExtrasPolicy`; the default refuses adapters whose extras differ.

Example:
    >>> import torch
    >>> from lorakit.adapter import Adapter, LoraModule
    >>> a = Adapter(modules={"q": LoraModule(torch.ones(1, 2), torch.ones(3, 1), alpha=1)})
    >>> b = Adapter(modules={"v": LoraModule(torch.ones(2, 2), torch.ones(3, 2), alpha=2)})
    >>> [k for k, _ in align([a, b], [1.0, 1.0]).items()]
    ['q', 'v']
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorakit.adapter import Adapter, LoraModule
from lorakit.errors import IncompatibleAdaptersError, OptionError, UnsupportedVariantError


class ExtrasPolicy(str, enum.Enum):
    """What a merge does with non-LoRA tensors (heads, modules_to_save)."""

    ERROR = "error"  # refuse when the adapters' extras differ (the default)
    FIRST = "first"  # keep the first adapter's extras
    DROP = "drop"  # write no extras


@dataclass(frozen=True)
class Term:
    """One adapter's contribution to one module: ``weight * module.scale * B @ A``."""

    index: int  # which input adapter
    weight: float
    module: LoraModule

    @property
    def coeff(self) -> float:
        return self.weight * self.module.scale


def parse_weights(weights: Sequence[float] | str | None, n: int) -> list[float]:
    """Weights per adapter: a list, ``"1,1,-0.5"``, or None for all ones.

    Example:
        >>> parse_weights("1,0.5", 2)
        [1.0, 0.5]
    """
    if weights is None:
        return [1.0] * n
    if isinstance(weights, str):
        try:
            weights = [float(w) for w in weights.split(",") if w.strip()]
        except ValueError as e:
            raise OptionError(f"--weights {weights!r} is not a comma-separated list of numbers",
                              key="weights") from e
    from lorakit.values import check_weight

    out = [check_weight(w, "weights") for w in weights]  # finite, |w| <= 1e6
    if len(out) != n:
        raise OptionError(f"{len(out)} weights for {n} adapters", key="weights")
    return out


def align(adapters: Sequence[Adapter], weights: Sequence[float], *, intersect: bool = False,
          allow_dora: bool = False, method: str = "merge") -> dict[str, list[Term]]:
    """``{module key: [Term, ...]}`` over the union (or intersection) of the adapters' modules.

    Shapes of a module must agree across adapters (same ``out``, ``in`` and kernel); DoRA modules
    are refused by name unless ``allow_dora``.
    """
    if len(adapters) < 1:
        raise OptionError("nothing to merge: no adapters given")
    keys: list[str] = []
    for a in adapters:
        for k in a.modules:
            if k not in keys:
                keys.append(k)
    if intersect:
        keys = [k for k in keys if all(k in a.modules for a in adapters)]
        if not keys:
            raise IncompatibleAdaptersError("the adapters share no module (--intersect)")
    out: dict[str, list[Term]] = {}
    for key in keys:
        terms: list[Term] = []
        for i, (a, w) in enumerate(zip(adapters, weights, strict=True)):
            m = a.modules.get(key)
            if m is None:
                continue
            if m.magnitude is not None and not allow_dora:
                raise UnsupportedVariantError(
                    f"DoRA module: the {method} method cannot honour its magnitude vector",
                    path=a.source, key=key, hint="merge the DoRA adapter into its base instead")
            if terms and _shape(terms[0].module) != _shape(m):
                raise IncompatibleAdaptersError(
                    f"update shape {_shape(m)} differs from {_shape(terms[0].module)} in "
                    f"{adapters[terms[0].index].source or 'adapter 0'}", path=a.source, key=key,
                    hint="are these adapters for the same base model?")
            terms.append(Term(i, w, m))
        out[key] = terms
    return out


def _shape(m: LoraModule) -> tuple[int, ...]:
    return (m.kind.value, *m.delta_shape)  # type: ignore[return-value]


def merge_extras(adapters: Sequence[Adapter], policy: ExtrasPolicy) -> dict[str, torch.Tensor]:
    """The extras of the merged adapter under ``policy``."""
    if policy is ExtrasPolicy.DROP:
        return {}
    first = adapters[0].extras
    if policy is ExtrasPolicy.FIRST:
        return dict(first)
    for a in adapters[1:]:
        if set(a.extras) != set(first) or any(not torch.equal(a.extras[k], first[k])
                                              for k in first):
            diff = sorted(set(a.extras) ^ set(first)) or [
                k for k in first if not torch.equal(a.extras[k], first[k])]
            raise IncompatibleAdaptersError(
                "the adapters' extra tensors (heads, modules_to_save) differ", path=a.source,
                key=diff[0] if diff else None,
                hint="choose --extras first or --extras drop")
    return dict(first)
