"""Adapter files whose LoRA pairs are numbered, not named: recognised and refused by name.

* cloneofsimo ``lora_diffusion`` safetensors (early 2023): keys ``unet:<i>:down`` / ``unet:<i>:up``
  and ``text_encoder:<i>:...``; pair ``i`` is the ``i``-th ``nn.Linear`` that ``lora_diffusion``'s
  injector met inside the module classes listed in the metadata, in ``named_modules`` order of
  the diffusers version it ran with. That order is not in the file (it changed across diffusers
  releases), so a reader would have to guess which layer each pair adapts.
* LoRA-ViT / Sam_LoRA (JamesQFreeman style) files: keys ``w_a_000`` / ``w_b_000`` ... with no
  module names and no alpha; pair ``2i`` and ``2i+1`` adapt the query and value slices of block
  ``i``'s fused ``qkv`` layer, which only the training script knows.

lorakit never guesses a module's identity, so both are refused with an error that says what the
file is and what is missing. A file mixing such keys with named ones is not affected here.

Example:
    >>> refuse_positional(["w_a_000", "w_b_000"], "lora_rank4.safetensors")
    Traceback (most recent call last):
    ...
    lorakit.errors.UnknownLayoutError: lora_rank4.safetensors: key 'w_a_000': positional LoRA-ViT / Sam_LoRA file ...
"""

from __future__ import annotations

import re
from pathlib import Path

from lorakit.errors import UnknownLayoutError

_CLONEOFSIMO = re.compile(r"^(?:unet|text_encoder(?:_\d)?):\d+:(?:up|down)$")
_LORA_VIT = re.compile(r"^w_[ab]_\d+$")


def refuse_positional(keys: list[str], path: Path | str) -> None:
    """Raise :class:`UnknownLayoutError` naming the format when ``keys`` are a positional LoRA
    file's (every LoRA key positional; other tensors such as textual-inversion embeddings may
    sit beside them); return otherwise."""
    clone = [k for k in keys if _CLONEOFSIMO.match(k)]
    if clone:
        raise UnknownLayoutError(
            f"cloneofsimo lora_diffusion file with positional keys ({len(clone)} tensors like "
            f"{clone[0]!r}): each pair is numbered by the order of the base model's Linear layers, "
            "which the file does not record, so its modules cannot be named", path=path,
            key=clone[0], hint="re-save it with named keys from lora_diffusion "
                               "(patch the pipeline, then export kohya or diffusers weights)")
    vit = sorted(k for k in keys if _LORA_VIT.match(k))
    if vit and len(vit) == len(keys):
        raise UnknownLayoutError(
            f"positional LoRA-ViT / Sam_LoRA file ({len(vit)} tensors w_a_NNN / w_b_NNN): pairs "
            "are numbered, with no module names or alpha, and each adapts a slice of a fused qkv "
            "layer that only its training script knows", path=path, key=vit[0],
            hint="export it with module names (e.g. as a PEFT adapter) from the training code")
