"""What RegMean's Grams cost for a Llama-2-7B-shaped model: bytes per layer, total, peak, and the
time of the Gram updates measured on this machine.

Shapes: 32 layers, hidden 4096, MLP 11008, LoRA on q/k/v/o/gate/up/down (as bench/merge_llm.py).
Inputs shared by several layers (q/k/v read one hidden state, gate/up another) have one Gram, so
a layer has four: three 4096 x 4096 and one 11008 x 11008, float64. The Gram update of a batch
``X (tokens, in)`` is ``G += X^T X`` in float64; its time is measured here for each width on
``--tokens`` random rows and scaled to ``--prompts`` x ``--prompt-tokens`` tokens per task.

Memory bound: captures run in passes whose Grams fit ``memory_gb`` (lorakit's option, default 4);
each pass stops the forward at its last layer and writes its Grams to the cache, so the resident
Grams never exceed the budget. The merge reads one module's Grams at a time: the running sum
``M`` and one task's Gram (two of the largest Gram).

Usage: python bench/grams_7b.py [--tokens 512] [--prompts 64] [--prompt-tokens 128]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

LAYERS, HIDDEN, MLP = 32, 4096, 11008
WIDTHS = {"q/k/v input": HIDDEN, "o input": HIDDEN, "gate/up input": HIDDEN, "down input": MLP}


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def time_update(width: int, tokens: int) -> float:
    x = torch.randn(tokens, width, dtype=torch.float64)
    g = torch.zeros(width, width, dtype=torch.float64)
    g.addmm_(x.T, x)  # warm
    t = time.perf_counter()
    g.addmm_(x.T, x)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--tasks", type=int, default=6)
    ap.add_argument("--memory-gb", type=float, default=4.0)
    args = ap.parse_args()
    per_layer = sum(8.0 * w * w for w in WIDTHS.values())
    undeduped = 8.0 * (4 * HIDDEN**2 + 2 * HIDDEN**2 + MLP**2)
    total = per_layer * LAYERS
    budget = args.memory_gb * 2**30
    layers_per_pass = max(1, int(budget // per_layer))
    passes = -(-LAYERS // layers_per_pass)
    forwards = sum(min(LAYERS, (p + 1) * layers_per_pass) for p in range(passes)) / LAYERS
    tokens = args.prompts * args.prompt_tokens
    secs = {name: time_update(w, args.tokens) * tokens / args.tokens
            for name, w in WIDTHS.items()}
    rows = [
        ("Grams per layer (4 shared inputs, float64)", gib(per_layer)),
        ("  without sharing q/k/v and gate/up (7 Grams)", gib(undeduped)),
        ("Grams per task, all 32 layers (cache on disk)", gib(total)),
        (f"cache for {args.tasks} tasks", gib(total * args.tasks)),
        (f"capture peak resident Grams (memory_gb={args.memory_gb:g})",
         f"{gib(min(total, layers_per_pass * per_layer))} ({layers_per_pass} layers per pass, "
         f"{passes} passes, {forwards:.1f} full forwards per task)"),
        ("merge peak (running sum + one task's down_proj Gram)", gib(2 * 8.0 * MLP**2)),
        (f"Gram updates per layer per task ({tokens} tokens, measured)",
         f"{sum(secs.values()):.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in secs.items())
         + ")"),
        ("Gram updates per task, 32 layers", f"{LAYERS * sum(secs.values()) / 60:.1f} min"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"Llama-2-7B shapes; threads {torch.get_num_threads()}")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
