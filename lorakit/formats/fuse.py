"""Exact split and fusion of LoRA modules whose layers are row blocks of one fused layer.

A fused layer ``W = [W_1; ...; W_k]`` (Flux ``qkv`` = ``to_q``, ``to_k``, ``to_v``) with the LoRA
``scale * B @ A`` splits into ``k`` LoRAs that share ``A`` and take B's row blocks:
``scale * B[rows_j] @ A`` is exactly the update of ``W_j``. The way back stacks ``A`` and puts the
``B_j`` on a block diagonal (rank ``r_1 + ... + r_k``), unless every part has the same ``A`` and
scale (a split file), when the fused module is ``A`` with the ``B_j`` stacked: rank ``r``, the
very tensors that were split. Missing parts have zero rows. A rank policy can then shrink the
block-diagonal form through the engine (``lorakit convert --rank``).

Example:
    >>> import torch
    >>> from lorakit.adapter import LoraModule
    >>> m = LoraModule(torch.randn(2, 4), torch.randn(6, 2), alpha=4.0)
    >>> q, k, v = split_module(m, (1, 1, 1))
    >>> torch.equal(fuse_modules([q, k, v], (1, 1, 1)).delta(), m.delta())
    True
"""

from __future__ import annotations

import torch

from lorakit.adapter import LoraModule, ModuleKind
from lorakit.errors import ShapeMismatchError, UnsupportedVariantError


def _sizes(out: int, weights: tuple[int, ...], key: str | None) -> list[int]:
    total = sum(weights)
    if out % total:
        raise ShapeMismatchError(f"fused layer has {out} outputs, not a multiple of the "
                                 f"{len(weights)} blocks' proportions {weights}", key=key)
    unit = out // total
    return [unit * w for w in weights]


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """Rows ``[a; b]`` -> ``[b; a]`` (shift/scale order of adaLN modulations). ``(out, ...)``"""
    h = t.shape[0] // 2
    return torch.cat([t[h:], t[:h]])


def needs_swap(m: LoraModule, swap: bool | str) -> bool:
    """A rule's swap applies to a 2x modulation (``out == 2 * in``), not to a 6x one;
    ``"always"`` applies to any even output (a gated feed-forward's ``[gate; value]``)."""
    if swap == "always":
        if m.out_features % 2:
            raise ShapeMismatchError(f"a layer of two swapped halves needs an even output, not "
                                     f"{m.out_features}")
        return True
    return bool(swap) and m.out_features == 2 * m.in_features


def split_module(m: LoraModule, weights: tuple[int, ...], *, swap: bool | str = False,
                 key: str | None = None) -> list[LoraModule | None]:
    """The row-block parts of a fused module, sharing ``m.down``; a part whose B block is all
    zero while another's is not is None (it adds nothing; a fused file that never trained it).

    Example:
        >>> import torch
        >>> m = LoraModule(torch.ones(1, 2), torch.tensor([[1.0], [0.0]]), alpha=1.0)
        >>> split_module(m, (1, 1))[1] is None
        True
    """
    if m.kind is not ModuleKind.LINEAR:
        raise UnsupportedVariantError(f"a fused {m.kind.value} LoRA cannot be split", key=key)
    up, bias, mag = m.up, m.bias, m.magnitude  # up (out, r)
    if mag is not None and mag.numel() != m.out_features:
        raise UnsupportedVariantError("DoRA magnitude per input column of a fused layer cannot "
                                      "be split into its parts", key=key)
    if needs_swap(m, swap):
        up = swap_halves(up)
        bias = swap_halves(bias) if bias is not None else None
        mag = swap_halves(mag.reshape(-1)).reshape(mag.shape) if mag is not None else None
    if len(weights) == 1:
        return [m.with_factors(m.down, up, bias=bias, magnitude=mag)]
    parts: list[LoraModule | None] = []
    row = 0
    for n in _sizes(m.out_features, weights, key):
        b = up[row:row + n]  # (n, r)
        parts.append(m.with_factors(
            m.down, b, bias=None if bias is None else bias[row:row + n],
            magnitude=None if mag is None else mag.reshape(-1)[row:row + n]))
        row += n
    nonzero = [p is not None and (bool(p.up.any()) or (p.bias is not None and bool(p.bias.any())))
               for p in parts]  # a part with a lora_B bias adds that bias
    if any(nonzero):
        parts = [p if nz else None for p, nz in zip(parts, nonzero, strict=True)]
    return parts


def _same_down(parts: list[LoraModule]) -> bool:
    first = parts[0]
    for p in parts[1:]:
        if p.scale != first.scale or p.rslora != first.rslora or p.down.shape != first.down.shape:
            return False
        if p.down.data_ptr() != first.down.data_ptr() or p.down.stride() != first.down.stride():
            if not torch.equal(p.down, first.down):
                return False
    return True


def fuse_modules(parts: list[LoraModule | None], weights: tuple[int, ...], *,
                 swap: bool | str = False, key: str | None = None) -> LoraModule:
    """One module for the fused layer whose row blocks ``parts`` adapt (None: not adapted).

    Shared ``A`` and scale: ``A`` with the ``B_j`` stacked (rank r). Otherwise ``A`` stacked and
    ``B`` block-diagonal (rank ``sum r_j``); unequal scales are folded into the B blocks (in
    float32, written in B's dtype) and the result has scale 1.

    Example:
        >>> import torch
        >>> q = LoraModule(torch.randn(2, 4), torch.randn(3, 2), alpha=2.0)
        >>> fuse_modules([q, None, q], (1, 1, 1)).up.shape
        torch.Size([9, 2])
    """
    present = [p for p in parts if p is not None]
    if not present:
        raise ShapeMismatchError("nothing to fuse", key=key)
    if any(p.kind is not ModuleKind.LINEAR for p in present):
        raise UnsupportedVariantError("only linear LoRA parts can be fused", key=key)
    units = {p.out_features // w for p, w in zip(parts, weights, strict=True) if p is not None}
    if len(units) != 1 or any(p.out_features % w for p, w in zip(parts, weights, strict=True)
                              if p is not None):
        raise ShapeMismatchError(f"the parts' output sizes {[p.out_features for p in present]} do "
                                 f"not fit the fused layer's proportions {weights}", key=key)
    if len({p.in_features for p in present}) != 1:
        raise ShapeMismatchError("the parts of one fused layer have different inputs", key=key)
    if any(p.magnitude is not None for p in present) and len(present) != len(parts):
        raise UnsupportedVariantError("DoRA parts cannot be fused with unadapted parts (their "
                                      "magnitudes need the base weights)", key=key)
    unit = units.pop()
    sizes = [unit * w for w in weights]
    first = present[0]
    if len(parts) == 1:
        out = first
    elif _same_down(present):
        out = _stack_up(parts, sizes, first)
    else:
        out = _block_diagonal(parts, sizes)
    if needs_swap(out, swap):
        out = out.with_factors(out.down, swap_halves(out.up),
                               bias=None if out.bias is None else swap_halves(out.bias))
    return out


def _rows(parts: list[LoraModule | None], sizes: list[int], get, dtype) -> torch.Tensor | None:
    if all(p is None or get(p) is None for p in parts):
        return None
    return torch.cat([get(p).reshape(-1).to(dtype) if p is not None and get(p) is not None
                      else torch.zeros(n, dtype=dtype) for p, n in zip(parts, sizes, strict=True)])


def _stack_up(parts: list[LoraModule | None], sizes: list[int], first: LoraModule) -> LoraModule:
    r, dt = first.rank, first.up.dtype
    up = torch.cat([p.up if p is not None else torch.zeros(n, r, dtype=dt)
                    for p, n in zip(parts, sizes, strict=True)])  # (out, r)
    return first.with_factors(first.down, up,
                              bias=_rows(parts, sizes, lambda p: p.bias, dt),
                              magnitude=_rows(parts, sizes, lambda p: p.magnitude, dt))


def _block_diagonal(parts: list[LoraModule | None], sizes: list[int]) -> LoraModule:
    present = [p for p in parts if p is not None]
    first = present[0]
    same = all(p.scale == first.scale and p.rslora == first.rslora for p in present)
    dt = first.up.dtype
    down = torch.cat([p.down.to(first.down.dtype) for p in present])  # (R, in)
    rank = down.shape[0]
    up = torch.zeros(sum(sizes), rank, dtype=torch.float32 if not same else dt)  # (out, R)
    row = col = 0
    for p, n in zip(parts, sizes, strict=True):
        if p is not None:
            block = p.up if same else p.up.to(torch.float32) * p.scale
            up[row:row + n, col:col + p.rank] = block
            col += p.rank
        row += n
    if same:
        alpha = first.scale * (rank ** 0.5 if first.rslora else rank)
        rslora = first.rslora
    else:
        up, alpha, rslora = up.to(dt), float(rank), False
    return LoraModule(down=down, up=up, alpha=alpha, rslora=rslora,
                      bias=_rows(parts, sizes, lambda p: p.bias, dt),
                      magnitude=_rows(parts, sizes, lambda p: p.magnitude, dt), kind=first.kind)


def add_modules(mods: list[LoraModule], key: str | None = None) -> LoraModule:
    """One module whose update is the sum of ``mods``' (same layer): factors concatenated,
    unequal scales folded into B (scale 1).

    Example:
        >>> import torch
        >>> a = LoraModule(torch.randn(2, 4), torch.randn(3, 2), alpha=2.0)
        >>> torch.allclose(add_modules([a, a]).delta(), 2 * a.delta())
        True
    """
    if len(mods) == 1:
        return mods[0]
    if len({m.delta_shape for m in mods}) != 1 or any(m.kind is not ModuleKind.LINEAR
                                                       for m in mods):
        raise ShapeMismatchError("two modules for one layer have different shapes", key=key)
    if any(m.magnitude is not None for m in mods):
        raise UnsupportedVariantError("two DoRA modules for one layer cannot be added", key=key)
    first = mods[0]
    same = all(m.scale == first.scale and m.rslora == first.rslora for m in mods)
    down = torch.cat([m.down for m in mods])  # (R, in)
    rank = down.shape[0]
    if same:
        up = torch.cat([m.up for m in mods], dim=1)  # (out, R)
        alpha = first.scale * (rank ** 0.5 if first.rslora else rank)
        rslora = first.rslora
    else:
        up = torch.cat([m.up.to(torch.float32) * m.scale for m in mods], dim=1).to(first.dtype)
        alpha, rslora = float(rank), False
    biases = [m.bias for m in mods if m.bias is not None]
    bias = torch.stack([b.to(torch.float32) for b in biases]).sum(0).to(biases[0].dtype) \
        if biases else None
    return LoraModule(down=down, up=up, alpha=alpha, rslora=rslora, bias=bias, kind=first.kind)
