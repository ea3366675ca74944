"""DoRA magnitude vectors in PEFT and LyCORIS/kohya files, and the conversions that are exact.

Both conventions rescale the adapted weight ``W' = m * (W + delta) / ||W + delta||``; they differ
in which norm ``m`` replaces (:class:`~lorakit.adapter.DoraAxis`) and in the stored shape:

==========================================  ===========================  ======================
file                                        axis (delta ``(out, in)``)   shape
==========================================  ===========================  ======================
PEFT ``lora_magnitude_vector``, linear      per output row               ``(out,)``
PEFT ``lora_magnitude_vector``, conv        per output channel           ``(1, out, 1, 1)``
PEFT ``lora_magnitude_vector``, embedding   per embedding row (``in``)   ``(num_embeddings,)``
LyCORIS ``dora_scale``, ``wd_on_out=True``  per output row / channel     ``(out, 1[, 1, 1])``
LyCORIS ``dora_scale``, ``wd_on_out=False`` per input column / channel   ``(1, in[, 1, 1])``
==========================================  ===========================  ======================

The per-output conventions agree (LyCORIS adds ``finfo.eps`` to the norm, far below any file's
precision), so a magnitude converts between PEFT/diffusers and kohya files exactly, reshaped. A
``wd_on_out=False`` scale has no PEFT form and is refused by name when written as PEFT or
diffusers. A 1-D kohya ``dora_scale`` (written by older lorakit releases) is read per output.

Example:
    >>> import torch
    >>> from lorakit.adapter import LoraModule
    >>> m = LoraModule(torch.ones(2, 3), torch.ones(4, 2), 2.0, magnitude=torch.ones(4, 1))
    >>> magnitude_axis(m, "lycoris", "q").value, tuple(peft_magnitude(m, "q").shape)
    ('out', (4,))
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorakit.adapter import DoraAxis, LoraModule, ModuleKind
from lorakit.errors import ShapeMismatchError, UnsupportedVariantError


def _shape_error(m: LoraModule, want: str, key: str, path: Path | str | None
                 ) -> ShapeMismatchError:
    mag = m.magnitude
    assert mag is not None
    return ShapeMismatchError(f"DoRA magnitude has shape {tuple(mag.shape)}, expected {want}",
                              path=path, key=key)


def magnitude_axis(m: LoraModule, convention: str, key: str,
                   path: Path | str | None = None) -> DoraAxis:
    """Which norm the magnitude of ``m`` replaces, read by the file's ``convention``
    (``"peft"`` for PEFT/diffusers files, ``"lycoris"`` for kohya ``dora_scale``); a shape that
    fits neither axis is a :class:`ShapeMismatchError` naming the key.

    Example:
        >>> m = LoraModule(torch.ones(2, 3), torch.ones(4, 2), 2.0, magnitude=torch.ones(1, 3))
        >>> magnitude_axis(m, "lycoris", "q").value
        'in'
    """
    mag = m.magnitude
    assert mag is not None
    out, cols = m.out_features, m.in_features
    if convention == "peft":
        if m.kind is ModuleKind.EMBEDDING:
            if mag.numel() != cols:
                raise _shape_error(m, f"({cols},): one value per embedding row", key, path)
            return DoraAxis.IN
        if mag.numel() != out:
            raise _shape_error(m, f"{out} values, one per output", key, path)
        return DoraAxis.OUT
    shape = tuple(int(s) for s in mag.shape)
    ones = all(s == 1 for s in shape[1:])
    if mag.ndim == 1 and shape[0] == out:
        return DoraAxis.OUT
    if mag.ndim >= 2 and shape[0] == out and ones:
        return DoraAxis.OUT
    if mag.ndim >= 2 and shape[0] == 1 and shape[1] == cols and all(s == 1 for s in shape[2:]):
        return DoraAxis.IN
    raise _shape_error(m, f"({out}, 1) (wd_on_out) or (1, {cols}) for a {out}x{cols} update",
                       key, path)


def peft_magnitude(m: LoraModule, key: str) -> torch.Tensor:
    """The magnitude as PEFT stores it: ``(out,)``, conv ``(1, out, 1, 1)``, embedding
    ``(num_embeddings,)``. A per-input (``wd_on_out=False``) scale has no PEFT form.

    Example:
        >>> m = LoraModule(torch.ones(2, 3), torch.ones(4, 2), 2.0, magnitude=torch.ones(1, 3),
        ...                magnitude_axis=DoraAxis.IN)
        >>> peft_magnitude(m, "q")
        Traceback (most recent call last):
        ...
        lorakit.errors.UnsupportedVariantError: key 'q': LyCORIS dora_scale on the input axis ...
    """
    mag = m.magnitude
    assert mag is not None
    want = DoraAxis.IN if m.kind is ModuleKind.EMBEDDING else DoraAxis.OUT
    if m.magnitude_axis is not want:
        raise UnsupportedVariantError(
            f"LyCORIS dora_scale on the input axis (wd_on_out=False) has no PEFT form: PEFT's "
            f"magnitude replaces the norm of each {'output row' if want is DoraAxis.OUT else 'input'}",
            key=key, hint="write kohya instead")
    if m.kind is ModuleKind.CONV:
        return mag.reshape(1, -1, 1, 1)  # (1, out, 1, 1)
    return mag.reshape(-1)


def lycoris_dora_scale(m: LoraModule, key: str) -> torch.Tensor:
    """The magnitude as LyCORIS/kohya ``dora_scale``: ``(out, 1)`` / ``(1, in)``, conv with two
    trailing ones (``(out, 1, 1, 1)``).

    Example:
        >>> m = LoraModule(torch.ones(2, 3), torch.ones(4, 2), 2.0, magnitude=torch.ones(4))
        >>> tuple(lycoris_dora_scale(m, "q").shape)
        (4, 1)
    """
    mag = m.magnitude
    assert mag is not None
    if m.kind is ModuleKind.EMBEDDING:
        raise UnsupportedVariantError("an embedding DoRA magnitude has no kohya form", key=key)
    tail = (1,) * len(m.kernel)
    if m.magnitude_axis is DoraAxis.OUT:
        return mag.reshape(-1, 1, *tail)  # (out, 1[, 1, 1])
    return mag.reshape(1, -1, *tail)  # (1, in[, 1, 1])
