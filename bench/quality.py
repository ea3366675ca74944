"""Quality benchmark: what merged and compressed zoo adapters still do, scored on the zoo's tasks.

Part 1 (merge): the six zoo adapters (``adapters_zoo/<task>/``) are merged by every method of
``lorakit.merge`` (registry order) with its paper defaults and a small sweep of its main knob
(density, ``k`` and reweighting, ``lam``, output rank policy); each merged adapter is added to
SmolLM2-135M-Instruct's weights and scored on every task's held-out split. The normalised score
of a task is the merged model's gain over the base model divided by the task's own adapter's gain
(perplexity: in log space), so 0 is the base model and 1 the single adapter; the table gives it
per task and the mean, with the base and single-adapter rows as bounds.

Part 2 (compression): each zoo adapter at ranks 8, 4 and 2 by the exact factored resize
(``lorakit.resize``, Eckart-Young optimal) and by LoRA-Squeeze's randomized route
(``lorakit.compress.squeeze``), scored on its own task. On the training tasks (``--train-tasks``,
default ``capital``; every training run costs minutes on 2 cores): LoRA-Squeeze followed by a few
recovery steps (``continue_training``), rank annealing during training from rank 16
(``RankAnnealer``, geometric schedule over the same steps as the zoo adapter) and a LoRA trained
directly at each rank (same steps, alpha = 2 * rank).

Writes ``bench/results/quality.{md,json,png}`` (``quality_quick.*`` with ``--quick``). The scores
are measured in this run; nothing is copied from elsewhere.

Example:
    OMP_WAIT_POLICY=PASSIVE python bench/quality.py --quick     # a few minutes
    OMP_WAIT_POLICY=PASSIVE python bench/quality.py             # ~40 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import lorakit  # noqa: E402
from adapters_zoo.tasks import Task  # noqa: E402
from adapters_zoo.train import (  # noqa: E402
    TrainConfig,
    answer_loss,
    applied,
    batches,
    peft_to_adapter,
    train_lora,
)
from lorakit.adapter import Adapter  # noqa: E402
from lorakit.compress.squeeze import SqueezeRoute, continue_training, squeeze  # noqa: E402
from lorakit.formats.peft import load_peft  # noqa: E402
from lorakit.lowrank import RankPolicy  # noqa: E402

RESULTS = ROOT / "bench" / "results"
ZOO = ROOT / "adapters_zoo"
Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# Configurations


@dataclass(frozen=True)
class MergeConfig:
    """One merge to score: a method, its options, an output rank policy and the task weights."""

    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    rank: int | None = None  # output rank policy (fixed); None: the method's default
    energy: float | None = None  # output rank policy (energy fraction)
    weight: float = 1.0  # every task's weight

    def policy(self) -> RankPolicy | None:
        if self.rank is not None:
            return RankPolicy.fixed(self.rank)
        if self.energy is not None:
            return RankPolicy.from_options(energy=self.energy)
        return None


def merge_configs(quick: bool = False) -> list[MergeConfig]:
    """Every registered method with its defaults, plus a sweep of its main knob."""
    if quick:
        return [MergeConfig("linear", "linear"), MergeConfig("svd r16", "svd"),
                MergeConfig("ties d=0.2", "ties", {"density": 0.2}),
                MergeConfig("lego (default)", "lego"),
                MergeConfig("knots d=0.2", "knots", {"density": 0.2}),
                MergeConfig("cart lam=1.5", "cart", {"lam": 1.5}),
                MergeConfig("regmean r16", "regmean", rank=16)]
    return [
        MergeConfig("linear (sum)", "linear"),
        MergeConfig("linear (mean)", "linear", weight=1 / 6),
        MergeConfig("task_arithmetic lam=0.5", "task_arithmetic", weight=0.5),
        MergeConfig("cat", "cat"),
        MergeConfig("svd r16", "svd"),
        MergeConfig("svd r32", "svd", rank=32),
        MergeConfig("svd energy 0.9", "svd", energy=0.9),
        MergeConfig("factor_linear", "factor_linear"),
        MergeConfig("ties d=0.1", "ties", {"density": 0.1}),
        MergeConfig("ties d=0.2", "ties", {"density": 0.2}),
        MergeConfig("ties d=0.5", "ties", {"density": 0.5}),
        MergeConfig("dare_linear d=0.5", "dare_linear", {"density": 0.5}),
        MergeConfig("dare_linear d=0.2", "dare_linear", {"density": 0.2}),
        MergeConfig("dare_ties d=0.5", "dare_ties", {"density": 0.5}),
        MergeConfig("magnitude_prune d=0.5", "magnitude_prune", {"density": 0.5}),
        MergeConfig("lego k=16 param", "lego", {"k": 16, "param_reweight": True}),
        MergeConfig("lego k=16 none", "lego", {"k": 16, "param_reweight": False}),
        MergeConfig("lego k=16 param+sqrt", "lego",
                    {"k": 16, "param_reweight": True, "output_reweight": "sqrt_ratio"}),
        MergeConfig("lego k=32 param", "lego", {"k": 32, "param_reweight": True}),
        MergeConfig("lego k=16 cluster_size", "lego",
                    {"k": 16, "param_reweight": False, "output_reweight": "cluster_size"}),
        MergeConfig("knots d=0.2", "knots", {"density": 0.2}),
        MergeConfig("knots d=0.5", "knots", {"density": 0.5}),
        MergeConfig("knots d=0.2 lam=1.5", "knots", {"density": 0.2, "lam": 1.5}),
        MergeConfig("knots sum", "knots", {"merge": "sum", "density": 1.0}),
        *rules_2025_configs(),
        *regmean_configs(),
    ]


def rules_2025_configs() -> list[MergeConfig]:
    """The 2025 data-free rules (defaults first, then the papers' scale where it differs and a
    step around the default) and the entry-wise rules in KnOTS / Core Space (issue 14)."""
    return [
        MergeConfig("tsv (alpha=0.3)", "tsv"),
        MergeConfig("tsv alpha=1 (paper)", "tsv", {"alpha": 1.0}),
        MergeConfig("tsv alpha=0.2", "tsv", {"alpha": 0.2}),
        MergeConfig("iso_c (alpha=1)", "iso_c", {"alpha": 1.0}),
        MergeConfig("iso_c alpha=1.5", "iso_c", {"alpha": 1.5}),
        MergeConfig("iso_cts (alpha=1)", "iso_cts", {"alpha": 1.0}),
        MergeConfig("iso_cts alpha=1.5", "iso_cts", {"alpha": 1.5}),
        MergeConfig("cart (rank 0.1, lam=1)", "cart", {"lam": 1.0}),
        MergeConfig("cart rank 0.2", "cart", {"rank_fraction": 0.2, "lam": 1.0}),
        MergeConfig("cart lam=1.5", "cart", {"lam": 1.5}),
        MergeConfig("breadcrumbs (lam=0.3)", "breadcrumbs"),
        MergeConfig("breadcrumbs lam=1 (paper)", "breadcrumbs", {"lam": 1.0}),
        MergeConfig("della (lam=0.5)", "della"),
        MergeConfig("ties core d=0.2 lam=0.5", "ties",
                    {"density": 0.2, "space": "core", "lam": 0.5}),
        MergeConfig("ties knots d=0.2 lam=0.5", "ties",
                    {"density": 0.2, "space": "knots", "lam": 0.5}),
        MergeConfig("dare_ties core d=0.5 lam=0.5", "dare_ties",
                    {"density": 0.5, "space": "core", "lam": 0.5}),
    ]


def regmean_configs() -> list[MergeConfig]:
    """RegMean (rank 16 output) with its defaults (shrink 1) and a sweep of shrink, activations,
    the Gram scale and modules only some adapters have."""
    return [
        MergeConfig("regmean r16", "regmean", rank=16),
        MergeConfig("regmean r16 shrink=0.9", "regmean", {"shrink": 0.9}, rank=16),
        MergeConfig("regmean r16 shrink=0.5", "regmean", {"shrink": 0.5}, rank=16),
        MergeConfig("regmean r16 shrink=0.1", "regmean", {"shrink": 0.1}, rank=16),
        MergeConfig("regmean r16 own", "regmean", {"activations": "own"}, rank=16),
        MergeConfig("regmean r16 gram mean", "regmean", {"gram_scale": "mean"}, rank=16),
        MergeConfig("regmean r16 missing=skip", "regmean", {"missing": "skip"}, rank=16),
        MergeConfig("regmean (full rank)", "regmean"),
    ]


def extra_configs() -> list[MergeConfig]:
    """A follow-up sweep of the scale knob ``lam`` (``--only``; not in the default full run)."""
    return [
        MergeConfig("ties d=0.1 lam=0.5", "ties", {"density": 0.1, "lam": 0.5}),
        MergeConfig("ties d=0.05", "ties", {"density": 0.05}),
        MergeConfig("knots d=0.2 lam=0.5", "knots", {"density": 0.2, "lam": 0.5}),
        MergeConfig("knots d=0.1 lam=0.5", "knots", {"density": 0.1, "lam": 0.5}),
        MergeConfig("knots d=0.2 lam=0.3", "knots", {"density": 0.2, "lam": 0.3}),
        MergeConfig("lego k=16 param lam=0.5", "lego", {"k": 16, "param_reweight": True},
                    weight=0.5),
    ]


def select_configs(labels: str, quick: bool = False) -> list[MergeConfig]:
    """The configs named in a comma-separated list (from the full list and the extra sweep)."""
    known = {c.label: c for c in merge_configs(quick) + merge_configs() + extra_configs()}
    out = []
    for label in (x.strip() for x in labels.split(",")):
        if label not in known:
            raise SystemExit(f"unknown config {label!r}; known: {', '.join(known)}")
        out.append(known[label])
    return out


# ---------------------------------------------------------------------------------------------
# Scoring


def subset(task: Task, limit: int | None) -> Sequence[tuple[str, str]]:
    return task.test if limit is None else task.test[:limit]


def score_tasks(model: Any, tok: Any, tasks: Mapping[str, Task], adapter: Adapter | None,
                limits: Mapping[str, int | None]) -> dict[str, float]:
    """Every task's metric with ``adapter`` added to the base weights (None: the base model)."""
    with applied(model, adapter):
        return {n: t.score(model, tok, subset(t, limits.get(n))) for n, t in tasks.items()}


def normalised(task: Task, base: float, single: float, value: float) -> float:
    """Gain over the base divided by the single adapter's gain (perplexity: log space).

    Example:
        >>> from adapters_zoo.tasks import Metric
        >>> t = Task("x", Metric.EXACT_MATCH, [], [])
        >>> normalised(t, 0.0, 0.8, 0.4)
        0.5
    """
    if task.higher_is_better:
        gain, full = value - base, single - base
    else:
        gain, full = math.log(base) - math.log(value), math.log(base) - math.log(single)
    return gain / full if abs(full) > 1e-12 else float("nan")


def mean(xs: Sequence[float]) -> float:
    ok = [x for x in xs if not math.isnan(x)]
    return sum(ok) / len(ok) if ok else float("nan")


@dataclass
class Row:
    """One scored line of a table."""

    label: str
    raw: dict[str, float]
    norm: dict[str, float]
    seconds: float = 0.0
    note: str = ""

    @property
    def mean(self) -> float:
        return mean(list(self.norm.values()))

    @property
    def clipped(self) -> float:
        """The mean with each task clipped to [-1, 1]: one broken task cannot dominate."""
        return mean([max(-1.0, min(1.0, x)) for x in self.norm.values()])


# ---------------------------------------------------------------------------------------------
# Part 1: merges


def calibration_prompts(tasks: Mapping[str, Task], n: int) -> list[list[str]]:
    """The first ``n`` unlabelled prompts of each task's TRAIN split (never the test split), as
    the adapter read them in training: the prompt for exact-match tasks, the passage for
    language modelling (whose prompt is empty)."""
    return [[t.prompt(x) if t.higher_is_better else y for x, y in t.train[:n]]
            for t in tasks.values()]


def run_merges(model: Any, tok: Any, tasks: Mapping[str, Task], adapters: Mapping[str, Adapter],
               configs: Sequence[MergeConfig], limits: Mapping[str, int | None],
               log: Log = print, seed: int = 0, calib_n: int = 64,
               grams: Path | None = None) -> dict[str, Any]:
    """Base and single-adapter bounds, then every merge config, scored on every task.

    Calibrated methods (``regmean``) get the scoring model itself and ``calib_n`` train prompts
    per task; their Grams are cached in ``grams`` so a sweep captures each set once (the first
    config's time includes the capture)."""
    from lorakit.merge.registry import get_method

    calibration = calibration_prompts(tasks, calib_n)
    names = list(tasks)
    t0 = time.perf_counter()
    base = score_tasks(model, tok, tasks, None, limits)
    log(f"base: {fmt_raw(tasks, base)} ({time.perf_counter() - t0:.0f}s)")
    single: dict[str, float] = {}
    for n in names:
        with applied(model, adapters[n]):
            single[n] = tasks[n].score(model, tok, subset(tasks[n], limits.get(n)))
    log(f"single: {fmt_raw(tasks, single)}")
    rows = [Row("base model", base, {n: 0.0 for n in names}),
            Row("single adapter (own task)", single, {n: 1.0 for n in names})]
    order = [adapters[n] for n in names]
    for cfg in configs:
        t = time.perf_counter()
        extra = {}
        if get_method(cfg.method).calibrated:
            extra = {"model": (model, tok), "calibration": calibration, "grams": grams}
        try:
            merged = lorakit.merge(order, cfg.method, weights=[cfg.weight] * len(order),
                                   policy=cfg.policy(), seed=seed, dtype=torch.float32,
                                   **extra, **cfg.options)
        except lorakit.LorakitError as exc:  # reported in the table, not hidden
            rows.append(Row(cfg.label, {}, {}, note=f"error: {exc}"))
            log(f"{cfg.label}: error: {exc}")
            continue
        merge_s = time.perf_counter() - t
        raw = score_tasks(model, tok, tasks, merged, limits)
        norm = {n: normalised(tasks[n], base[n], single[n], raw[n]) for n in names}
        ranks = sorted(set(merged.ranks().values()))
        row = Row(cfg.label, raw, norm, time.perf_counter() - t,
                  note=f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}")
        rows.append(row)
        log(f"{cfg.label}: mean {row.mean:.3f} | {fmt_raw(tasks, raw)} | merge {merge_s:.1f}s, "
            f"total {row.seconds:.0f}s")
    return {"rows": rows, "base": base, "single": single,
            "configs": [asdict(c) for c in configs]}


def fmt_raw(tasks: Mapping[str, Task], raw: Mapping[str, float]) -> str:
    return ", ".join(f"{n} {raw[n]:.3f}" for n in tasks if n in raw)


# ---------------------------------------------------------------------------------------------
# Part 2: compression


@dataclass
class CompressPoint:
    task: str
    route: str
    rank: int
    raw: float
    norm: float
    seconds: float = 0.0


def run_compression(model: Any, tok: Any, tasks: Mapping[str, Task],
                    adapters: Mapping[str, Adapter], base: Mapping[str, float],
                    single: Mapping[str, float], ranks: Sequence[int],
                    limits: Mapping[str, int | None], train_tasks: Sequence[str],
                    train_configs: Mapping[str, TrainConfig], recovery_steps: int = 10,
                    log: Log = print, seed: int = 0) -> list[CompressPoint]:
    """Score against rank: exact resize, LoRA-Squeeze (randomized route), and on
    ``train_tasks`` squeeze + recovery steps, rank annealing and direct training."""
    points: list[CompressPoint] = []

    def add(task: str, route: str, rank: int, adapter: Adapter, seconds: float) -> None:
        t = tasks[task]
        with applied(model, adapter):
            raw = t.score(model, tok, subset(t, limits.get(task)))
        p = CompressPoint(task, route, rank, raw, normalised(t, base[task], single[task], raw),
                          seconds)
        points.append(p)
        log(f"compress {task} {route} r{rank}: {raw:.3f} (norm {p.norm:.3f}, {seconds:.1f}s)")

    for name in tasks:
        for r in ranks:
            t = time.perf_counter()
            small, _ = lorakit.resize(adapters[name], RankPolicy.fixed(r), dtype=torch.float32)
            add(name, "resize (exact)", r, small, time.perf_counter() - t)
            t = time.perf_counter()
            small, _ = squeeze(adapters[name], RankPolicy.fixed(r),
                               method=SqueezeRoute.RANDOMIZED, seed=seed, dtype=torch.float32)
            add(name, "squeeze (randomized)", r, small, time.perf_counter() - t)
    for name in train_tasks:
        cfg = train_configs[name]
        for r in ranks:
            t = time.perf_counter()
            adapter = squeeze_recover(model, tok, tasks[name], adapters[name], cfg, r,
                                      recovery_steps)
            add(name, f"squeeze + {recovery_steps} steps", r, adapter, time.perf_counter() - t)
            t = time.perf_counter()
            adapter = anneal_train(model, tok, tasks[name], cfg, r)
            add(name, "annealed in training", r, adapter, time.perf_counter() - t)
            t = time.perf_counter()
            adapter = direct_train(model, tok, tasks[name], cfg, r)
            add(name, "trained at rank", r, adapter, time.perf_counter() - t)
    return points


def _adapter_to_peft(model: Any, adapter: Adapter, cfg: TrainConfig) -> Any:
    """A trainable PEFT model holding ``adapter``'s factors (float32)."""
    import tempfile

    from peft import PeftModel

    from lorakit.formats.peft import save_peft

    with tempfile.TemporaryDirectory() as tmp:
        save_peft(adapter, Path(tmp), dtype=torch.float32)
        return PeftModel.from_pretrained(model, tmp, is_trainable=True)


def squeeze_recover(model: Any, tok: Any, task: Task, adapter: Adapter, cfg: TrainConfig,
                    rank: int, steps: int) -> Adapter:
    """Cont-Squeeze: cut the trained adapter to ``rank`` (exact SVD), then ``steps`` steps."""
    pm = _adapter_to_peft(model, adapter, cfg)
    stream = batches(task, tok, cfg.batch_size, cfg.seed + 1)
    continue_training(pm, answer_loss, stream, steps, lr=cfg.lr * 0.25, rank=rank)
    pm.eval()
    out = peft_to_adapter(pm)
    pm.unload()
    return out


def anneal_train(model: Any, tok: Any, task: Task, cfg: TrainConfig, rank: int) -> Adapter:
    """In-Squeeze: train from rank ``cfg.rank`` with geometric cuts down to ``rank``."""
    from lorakit.compress.anneal import RankAnnealer, geometric_schedule

    annealer = RankAnnealer(geometric_schedule(cfg.rank, rank, None, cfg.steps),
                            optimizer_state="project", seed=cfg.seed)
    run = train_lora(model, tok, task, cfg, annealer=annealer)
    out = peft_to_adapter(run.model)
    run.model.unload()
    return out


def direct_train(model: Any, tok: Any, task: Task, cfg: TrainConfig, rank: int) -> Adapter:
    """A LoRA trained at ``rank`` from the start (alpha = 2 * rank: the zoo's scale)."""
    from dataclasses import replace

    run = train_lora(model, tok, task, replace(cfg, rank=rank, alpha=cfg.scale * rank))
    out = peft_to_adapter(run.model)
    run.model.unload()
    return out


# ---------------------------------------------------------------------------------------------
# Reports


def _cell(x: float) -> str:
    return "n/a" if isinstance(x, float) and math.isnan(x) else f"{x:.2f}"


def _raw_cell(task: Task, x: float) -> str:
    return f"{x:.1%}" if task.higher_is_better else f"{x:.2f}"


def markdown(tasks: Mapping[str, Task], merges: Mapping[str, Any],
             points: Sequence[CompressPoint], meta: Mapping[str, Any]) -> str:
    """The report: merge table (normalised and raw), compression table, setup."""
    names = list(tasks)
    lines = [f"# lorakit quality benchmark{' (quick)' if meta.get('quick') else ''}", "",
             f"Base model {meta.get('model', '?')}; zoo adapters `adapters_zoo/<task>/` (rank 16). "
             f"Measured {meta.get('date', '')} on {meta.get('machine', '?')}, "
             f"{meta.get('threads', '?')} threads; wall time {meta.get('wall_s', 0):.0f} s.", "",
             "Test examples per task: " + ", ".join(
                 f"{n} {meta.get('test_sizes', {}).get(n, '?')}" for n in names) +
             ". Metrics: exact match (add, capital, reverse, date) and perplexity (wiki, news; "
             "lower is better).", "",
             "## Merging the six adapters", "",
             "Normalised score per task: (merged - base) / (single - base), perplexity in log "
             "space; 0 = base model, 1 = the task's own adapter. All tasks weight 1 unless the "
             "label says otherwise.", "",
             "| method | " + " | ".join(names) + " | mean | clipped mean | output | s |",
             "|---|" + "---|" * (len(names) + 4)]
    rows: list[Row] = merges["rows"]
    for row in rows:
        if not row.norm:
            lines.append(f"| {row.label} | " + " | ".join("—" for _ in names)
                         + f" | — | — | {row.note} | |")
            continue
        lines.append(f"| {row.label} | " + " | ".join(_cell(row.norm[n]) for n in names)
                     + f" | **{_cell(row.mean)}** | {_cell(row.clipped)} | {row.note} "
                     f"| {row.seconds:.0f} |")
    lines += ["", "Raw metrics:", "", "| method | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]
    for row in rows:
        if row.raw:
            lines.append(f"| {row.label} | "
                         + " | ".join(_raw_cell(tasks[n], row.raw[n]) for n in names) + " |")
    scored = [r for r in rows[2:] if r.norm]
    if scored:
        best = max(scored, key=lambda r: r.mean)
        robust = max(scored, key=lambda r: r.clipped)
        lines += ["", f"Best mean normalised score: **{best.label}** ({best.mean:.2f}); best "
                  f"clipped mean (each task clipped to [-1, 1]): **{robust.label}** "
                  f"({robust.clipped:.2f})."]
    if points:
        lines += ["", "## Compression: score against rank", "",
                  "Normalised to the rank-16 adapter's gain on its own task.", "",
                  "| task | route | " + " | ".join(f"r{r}" for r in sorted(
                      {p.rank for p in points}, reverse=True)) + " |",
                  "|---|---|" + "---|" * len({p.rank for p in points})]
        ranks = sorted({p.rank for p in points}, reverse=True)
        keys = list(dict.fromkeys((p.task, p.route) for p in points))
        for task, route in keys:
            cells = []
            for r in ranks:
                hit = [p for p in points if (p.task, p.route, p.rank) == (task, route, r)]
                cells.append(f"{_cell(hit[0].norm)} ({_raw_cell(tasks[task], hit[0].raw)})"
                             if hit else "")
            lines.append(f"| {task} | {route} | " + " | ".join(cells) + " |")
        lines += ["", "Mean normalised score over tasks:", "",
                  "| route | tasks | " + " | ".join(f"r{r}" for r in ranks) + " |",
                  "|---|---|" + "---|" * len(ranks)]
        for route in dict.fromkeys(p.route for p in points):
            ts = sorted({p.task for p in points if p.route == route})
            cells = [_cell(mean([p.norm for p in points if p.route == route and p.rank == r]))
                     for r in ranks]
            lines.append(f"| {route} | {', '.join(ts)} | " + " | ".join(cells) + " |")
    command = meta.get("command") or ("python bench/quality.py"
                                      + (" --quick" if meta.get("quick") else ""))
    lines += ["", f"Produced by `{command}`.", ""]
    return "\n".join(lines)


def to_json(tasks: Mapping[str, Task], merges: Mapping[str, Any],
            points: Sequence[CompressPoint], meta: Mapping[str, Any]) -> dict[str, Any]:
    return {"meta": dict(meta),
            "tasks": {n: {"metric": t.metric.value, "higher_is_better": t.higher_is_better}
                      for n, t in tasks.items()},
            "merge": [{"label": r.label, "raw": r.raw, "normalised": r.norm,
                       "mean": None if math.isnan(r.mean) else r.mean,
                       "clipped_mean": None if math.isnan(r.clipped) else r.clipped,
                       "seconds": r.seconds,
                       "note": r.note} for r in merges["rows"]],
            "merge_configs": merges.get("configs", []),
            "compression": [asdict(p) for p in points]}


def plot(merges: Mapping[str, Any], points: Sequence[CompressPoint], out: Path) -> None:
    """Two panels: mean normalised score per merge config; score against rank per route."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in merges["rows"] if r.norm]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, max(4, 0.32 * len(rows) + 1)))
    ax1.barh([r.label for r in rows][::-1], [r.mean for r in rows][::-1], color="tab:blue")
    ax1.axvline(0, color="k", lw=0.8)
    ax1.axvline(1, color="k", lw=0.8, ls="--")
    ax1.set_xlabel("mean normalised score (0 = base, 1 = single adapter)")
    ax1.set_title("merging the six zoo adapters")
    for route in dict.fromkeys(p.route for p in points):
        ranks = sorted({p.rank for p in points if p.route == route})
        ys = [mean([p.norm for p in points if p.route == route and p.rank == r]) for r in ranks]
        ax2.plot(ranks, ys, marker="o", label=route)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("rank")
    ax2.set_ylabel("normalised score (1 = rank-16 adapter)")
    ax2.set_title("compression")
    if points:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def write_reports(folder: Path, stem: str, tasks: Mapping[str, Task], merges: Mapping[str, Any],
                  points: Sequence[CompressPoint], meta: Mapping[str, Any]) -> list[Path]:
    """Write ``<stem>.md``, ``<stem>.json`` and ``<stem>.png`` atomically (replacing old ones)."""
    from lorakit.io import atomic_output

    folder.mkdir(parents=True, exist_ok=True)
    outs = []
    with atomic_output(folder / f"{stem}.md", force=True) as tmp:
        tmp.write_text(markdown(tasks, merges, points, meta))
    outs.append(folder / f"{stem}.md")
    with atomic_output(folder / f"{stem}.json", force=True) as tmp:
        tmp.write_text(json.dumps(to_json(tasks, merges, points, meta), indent=2) + "\n")
    outs.append(folder / f"{stem}.json")
    with atomic_output(folder / f"{stem}.png", force=True) as tmp:
        plot(merges, points, tmp.with_suffix(".png"))
        tmp.with_suffix(".png").replace(tmp)
    outs.append(folder / f"{stem}.png")
    return outs


# ---------------------------------------------------------------------------------------------
# Main


def load_zoo(names: Sequence[str], folder: Path = ZOO) -> dict[str, Adapter]:
    """The committed zoo adapters, in float32."""
    out = {}
    for n in names:
        a = load_peft(folder / n)
        for m in a.modules.values():
            m.down, m.up = m.down.float(), m.up.float()
        out[n] = a
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small subset (a few minutes)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-tasks", default=None,
                   help="tasks for the training-based compression routes (default: capital; "
                        "--quick: none); 'none' for none")
    p.add_argument("--only", default=None, help="comma-separated config labels to run "
                   "(full list and extra sweep); writes quality_only.* unless --stem")
    p.add_argument("--no-compression", action="store_true", help="skip part 2")
    p.add_argument("--stem", default=None, help="report file name stem")
    p.add_argument("--exact-limit", type=int, default=None, help="test examples per exact task")
    p.add_argument("--lm-limit", type=int, default=None, help="test passages per LM task")
    p.add_argument("--calib", type=int, default=64, help="train prompts per task for "
                   "calibrated merges (regmean)")
    p.add_argument("--grams", type=Path, default=None, help="Gram cache folder (default: a "
                   "temporary folder for this run)")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(args.threads)
    from adapters_zoo.build import CONFIGS
    from adapters_zoo.model import MODEL_ID, load_smollm2
    from adapters_zoo.tasks import TASK_NAMES, TASKS

    start = time.perf_counter()
    exact_limit = args.exact_limit or (16 if args.quick else 40)
    lm_limit = args.lm_limit or (8 if args.quick else 20)
    tasks = {n: TASKS[n] for n in TASK_NAMES}
    limits = {n: exact_limit if t.higher_is_better else lm_limit for n, t in tasks.items()}
    train_tasks = ([] if args.quick else ["capital"]) if args.train_tasks is None else \
        [t for t in args.train_tasks.split(",") if t and t != "none"]
    model, tok = load_smollm2()
    adapters = load_zoo(TASK_NAMES)
    log = lambda s: print(s, flush=True)  # noqa: E731
    configs = select_configs(args.only, args.quick) if args.only else merge_configs(args.quick)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lorakit-quality-grams-") as tmp:
        merges = run_merges(model, tok, tasks, adapters, configs, limits, log,
                            calib_n=args.calib, grams=args.grams or Path(tmp))
    ranks = [4] if args.quick else [8, 4, 2]
    comp_tasks = {n: tasks[n] for n in (["capital", "date"] if args.quick else TASK_NAMES)}
    points = [] if args.no_compression else run_compression(
        model, tok, comp_tasks, adapters, merges["base"], merges["single"], ranks, limits,
        train_tasks, CONFIGS, recovery_steps=5 if args.quick else 10, log=log)
    meta = {"quick": args.quick, "model": MODEL_ID, "threads": args.threads,
            "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "wall_s": time.perf_counter() - start, "torch": torch.__version__,
            "test_sizes": {n: len(subset(t, limits[n])) for n, t in tasks.items()},
            "train_tasks": train_tasks}
    stem = args.stem or ("quality_only" if args.only else
                         "quality_quick" if args.quick else "quality")
    meta["configs"] = [c.label for c in configs]
    meta["command"] = " ".join(["python bench/quality.py", *(
        f"'{a}'" if " " in a else a for a in (sys.argv[1:] if argv is None else argv))])
    outs = write_reports(args.out, stem, tasks, merges, points, meta)
    print(markdown(tasks, merges, points, meta))
    print("wrote " + ", ".join(str(o) for o in outs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
