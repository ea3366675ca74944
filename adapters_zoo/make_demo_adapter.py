"""Generate the small demo adapter that `make demo` inspects, converts and resizes.

A GPT-2-shaped PEFT LoRA (c_attn and c_proj of 4 layers) with a decaying spectrum, rank 8 on
attention and rank 4 (``rank_pattern``) on the MLP projection, alpha 16, written with a fixed seed.
The zoo issue replaces it with adapters trained on a real model.

Example:
    python adapters_zoo/make_demo_adapter.py demo_out/demo_adapter
"""

from __future__ import annotations

import sys

import torch

from lorakit import Adapter, LoraModule, save

HIDDEN = 768


def build(seed: int = 0, layers: int = 4) -> Adapter:
    """The demo adapter, deterministic for a seed."""
    g = torch.Generator().manual_seed(seed)
    modules: dict[str, LoraModule] = {}
    shapes = {"attn.c_attn": (3 * HIDDEN, HIDDEN, 8), "attn.c_proj": (HIDDEN, HIDDEN, 8),
              "mlp.c_proj": (HIDDEN, 4 * HIDDEN, 4)}
    for layer in range(layers):
        for name, (out, inp, r) in shapes.items():
            decay = torch.logspace(0, -2, r)  # (r,) a decaying spectrum, like trained adapters
            a = torch.randn(r, inp, generator=g) / inp**0.5  # (r, in)
            b = torch.randn(out, r, generator=g) * decay / r  # (out, r)
            modules[f"transformer.h.{layer}.{name}"] = LoraModule(down=a, up=b, alpha=16.0)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "fan_in_fan_out": True,
              "target_modules": ["c_attn", "c_proj"], "base_model_name_or_path": "gpt2"}
    return Adapter(modules=modules, base_model="gpt2", source_format=None, config=config)


def main(out: str = "demo_out/demo_adapter") -> None:
    adapter = build()
    written = save(adapter, out, "peft", force=True,
                   provenance={"command": "python adapters_zoo/make_demo_adapter.py",
                               "sources": []})
    print(f"generated {written}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
