"""Text encoders the diffusion families share: CLIP (L and bigG) and T5 encoders.

Paths are transformers' module names. transformers 5 drops the ``text_model.`` level of
``CLIPTextModel`` (``encoder.layers.0...``), so both spellings are known.

Example:
    >>> CLIP_L.knows("text_model.encoder.layers.3.self_attn.q_proj")
    True
    >>> CLIP_L.knows("encoder.layers.3.mlp.fc1")
    True
"""

from __future__ import annotations

from lorakit.formats.families.base import BlockType, Component

_CLIP_SUBS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
              "mlp.fc1", "mlp.fc2")
_CLIP_KNOWN = (r"(?:text_model\.)?encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])",
               r"text_projection")


def clip(name: str, label: str, kohya: str, layers: int | tuple[int, ...]) -> Component:
    """A CLIP text encoder component with ``layers`` encoder layers (a tuple: the layer counts
    of the family's released encoders, e.g. 12 and 23 for SD 1.x and 2.x)."""
    sizes = layers if isinstance(layers, tuple) else ()
    return Component(name, label, kohya, known=_CLIP_KNOWN, blocks=(
        BlockType(f"{label} layers", "encoder.layers.{i}", max(sizes or (layers,)), _CLIP_SUBS,
                  head=r"(?:text_model\.)?", sizes=sizes),))


_T5_SUBS = ("layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v",
            "layer.0.SelfAttention.o", "layer.1.DenseReluDense.wi_0",
            "layer.1.DenseReluDense.wi_1", "layer.1.DenseReluDense.wo")


def t5(name: str, label: str, kohya: str, layers: int = 24) -> Component:
    """A T5 v1.1 encoder component (gated-GELU FFN)."""
    known = (r"encoder\.block\.\d+\.layer\.0\.SelfAttention\.[qkvo]",
             r"encoder\.block\.\d+\.layer\.1\.DenseReluDense\.(?:wi_0|wi_1|wo)")
    return Component(name, label, kohya, known=known, blocks=(
        BlockType(f"{label} blocks", "encoder.block.{i}", layers, _T5_SUBS),))


CLIP_L = clip("text_encoder", "text encoder", "lora_te1_", 12)
