"""The Trans-LoRA pipeline: synthesize -> filter -> label -> train, each stage resumable.

Every stage writes its output into the work folder (``synthetic.jsonl``, ``scored.jsonl``,
``filtered.jsonl``, ``labelled.jsonl``, ``labelled_unfiltered.jsonl``, ``baselines/<name>/``) and
records a fingerprint of what produced it in ``state.json``. A rerun with the same inputs and
options skips the finished stages; a stage whose inputs changed is run again.

Example:
    >>> result = transfer("source_dir", "adapter_dir", "target_dir", "seeds.jsonl", "out",
    ...                   discriminator="disc", options=TransferOptions(task="add"))
    ... # doctest: +SKIP
    >>> result.counts["synthetic_after_filter"]                  # doctest: +SKIP
    143
"""

from __future__ import annotations

import enum
import gc
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from lorakit.errors import OptionError
from lorakit.io import atomic_output, check_output
from lorakit.transfer.card import model_card
from lorakit.transfer.discriminator import Discriminator
from lorakit.transfer.generate import GenerateOptions
from lorakit.transfer.label import label
from lorakit.transfer.models import (
    ModelRef,
    adapter_config,
    check_adapter_base,
    load_causal_lm,
    load_teacher,
    require_extra,
)
from lorakit.transfer.progress import stage_progress
from lorakit.transfer.prompts import PromptFormat
from lorakit.transfer.records import Example, read_examples, write_examples
from lorakit.transfer.synth import SynthOptions, synthesize
from lorakit.transfer.train import StudentOptions, options_dict, save_student, train_student


class Baseline(str, enum.Enum):
    """Comparison adapters the command can also produce."""

    SEEDS = "seeds"  # trained on the seed examples only
    UNFILTERED = "unfiltered"  # trained on synthetic inputs the filter did not choose
    COPY = "copy"  # the source weights as they are, when every module shape matches


class UnfilteredSize(str, enum.Enum):
    """How many synthetic inputs the ``unfiltered`` baseline trains on.

    ``matched`` (default): as many as the filter kept, the first ones generated (an unbiased
    sample, since generation order does not depend on the discriminator). Both adapters then see
    the same amount of data, so the comparison measures what the filter chose, as in Trans-LoRA,
    which synthesizes until the *filtered* set has the wanted size. ``all``: every synthetic
    input (more data than the filtered adapter gets).
    """

    MATCHED = "matched"
    ALL = "all"


@dataclass(frozen=True)
class FilterOptions:
    """Keep inputs scoring at least ``threshold`` (default: the discriminator's), or the
    ``keep_top`` fraction with the highest scores."""

    threshold: float | None = None
    keep_top: float | None = None

    def __post_init__(self) -> None:
        if self.threshold is not None and self.keep_top is not None:
            raise OptionError("give --filter-threshold or --keep-top, not both")
        if self.keep_top is not None and not 0 < self.keep_top <= 1:
            raise OptionError(f"--keep-top must be in (0, 1], got {self.keep_top}")


@dataclass(frozen=True)
class TransferOptions:
    """Everything a transfer can be told, shared by the API and the CLI."""

    task: str | None = None
    num_seeds: int = 5
    synth: SynthOptions = SynthOptions()
    filter: FilterOptions = FilterOptions()
    label: GenerateOptions = GenerateOptions(max_new_tokens=32)
    student: StudentOptions = StudentOptions()
    prompt: PromptFormat = PromptFormat()
    teacher_prompt: PromptFormat | None = None  # default: ``prompt``
    baselines: tuple[Baseline, ...] = ()
    unfiltered_size: UnfilteredSize = UnfilteredSize.MATCHED
    check_base: bool = True
    source_name: str | None = None  # the Hub id a local --source-model stands for
    discriminator_model: str | None = None  # override the base model recorded in D
    quiet: bool = False
    command: str | None = None  # recorded in the model card

    def __post_init__(self) -> None:
        if self.num_seeds < 1:
            raise OptionError(f"--num-seeds must be >= 1, got {self.num_seeds}")


@dataclass
class TransferResult:
    """What a transfer wrote: the adapter, the baselines, counts, and which stages ran."""

    output: Path
    work_dir: Path
    counts: dict[str, int] = field(default_factory=dict)
    stages: dict[str, str] = field(default_factory=dict)  # stage -> "ran" | "resumed"
    baselines: dict[str, str] = field(default_factory=dict)  # name -> path or "skipped: why"
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["output"], d["work_dir"] = str(self.output), str(self.work_dir)
        return d


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file() and p.suffix in {".json", ".safetensors", ".bin", ".jsonl"}:
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


class _Run:
    """State of one transfer: the work folder, stage fingerprints and loaded models."""

    def __init__(self, source: ModelRef, adapter: Path, target: ModelRef, seeds: list[Example],
                 work: Path, options: TransferOptions, result: TransferResult) -> None:
        self.source, self.adapter, self.target = source, adapter, target
        self.seeds, self.work, self.o, self.result = seeds, work, options, result
        self.state_path = work / "state.json"
        self.state: dict[str, str] = {}
        if self.state_path.is_file():
            try:
                self.state = dict(json.loads(self.state_path.read_text()))
            except (ValueError, TypeError):
                self.log(f"{self.state_path} is unreadable: every stage runs again")
        self._target_model = None

    # -- bookkeeping --------------------------------------------------------------------------
    def done(self, stage: str, fp: str, path: Path) -> bool:
        return path.exists() and self.state.get(stage) == fp

    def mark(self, stage: str, fp: str, status: str, started: float) -> None:
        self.state[stage] = fp
        with atomic_output(self.state_path, force=True) as tmp:
            tmp.write_text(json.dumps(self.state, indent=2) + "\n")
        self.result.stages[stage] = status
        self.result.seconds[stage] = round(time.monotonic() - started, 2)

    def log(self, msg: str) -> None:
        if not self.o.quiet:
            print(f"lorakit transfer: {msg}", file=sys.stderr)

    def progress(self, what: str, total: int):
        return stage_progress(what, total, enabled=not self.o.quiet)

    def target_model(self):
        if self._target_model is None:
            self.log(f"loading target model {self.target.spec}")
            self._target_model = load_causal_lm(self.target)
        return self._target_model

    def stage(self, name: str, fp: str, path: Path, run: Callable[[], None]) -> None:
        if self.done(name, fp, path):
            self.result.stages[name] = "resumed"
            self.log(f"{name}: reusing {path}")
            return
        started = time.monotonic()
        run()
        self.mark(name, fp, "ran", started)


def _records_fp(run: _Run) -> dict[str, str]:
    o = run.o
    seeds_fp = _digest([e.to_json() for e in run.seeds])
    synth = _digest(["synthetic", run.target.spec, seeds_fp, asdict(o.synth)])
    return {"seeds": seeds_fp, "synthetic": synth}


def _synthesize(run: _Run, fp: str) -> list[Example]:
    path = run.work / "synthetic.jsonl"

    def go() -> None:
        model, tok = run.target_model()
        with run.progress("synthesizing inputs (target model)", run.o.synth.count) as adv:
            out = synthesize(model, tok, run.seeds, run.o.synth, advance=adv)
        write_examples(path, out)

    run.stage("synthetic", fp, path, go)
    return read_examples(path, need_output=False)


def _filter(run: _Run, synthetic: list[Example], disc_path: Path | None,
            fp: str) -> list[Example]:
    scored_path, path = run.work / "scored.jsonl", run.work / "filtered.jsonl"

    def go() -> None:
        if disc_path is None:
            write_examples(scored_path, synthetic)
            write_examples(path, synthetic)
            return
        disc = Discriminator.load(disc_path, task=run.o.task, model=run.o.discriminator_model)
        with run.progress("scoring with the discriminator", len(synthetic)) as adv:
            scores = disc.score([e.input for e in synthetic], advance=adv)
        scored = [replace(e, score=s) for e, s in zip(synthetic, scores, strict=True)]
        write_examples(scored_path, scored)
        write_examples(path, select(scored, run.o.filter, disc.threshold))
        del disc
        gc.collect()

    run.stage("filtered", fp, path, go)
    return read_examples(path, need_output=False)


def select(scored: list[Example], options: FilterOptions, default_threshold: float) -> list[Example]:
    """The examples the filter keeps, in their original order.

    Example:
        >>> xs = [Example("a", score=0.9), Example("b", score=0.2), Example("c", score=0.6)]
        >>> [e.input for e in select(xs, FilterOptions(keep_top=0.5), 0.5)]
        ['a', 'c']
        >>> [e.input for e in select(xs, FilterOptions(), 0.7)]
        ['a']
    """
    if options.keep_top is not None:
        n = max(1, round(len(scored) * options.keep_top))
        ranked = sorted(range(len(scored)), key=lambda i: -(scored[i].score or 0.0))
        keep = set(ranked[:n])
        return [e for i, e in enumerate(scored) if i in keep]
    threshold = options.threshold if options.threshold is not None else default_threshold
    return [e for e in scored if (e.score or 0.0) >= threshold]


class _Teacher:
    """Loads the source model with its adapter on first use."""

    def __init__(self, run: _Run) -> None:
        self.run, self.pair = run, None

    def label(self, examples: list[Example], what: str) -> list[Example]:
        if self.pair is None:
            self.run.log(f"loading teacher {self.run.source.spec} + {self.run.adapter}")
            self.pair = load_teacher(self.run.source, self.run.adapter,
                                     check_base=self.run.o.check_base)
        fmt = self.run.o.teacher_prompt or self.run.o.prompt
        with self.run.progress(f"labelling {what} (teacher)", len(examples)) as adv:
            return label(*self.pair, examples, fmt, self.run.o.label, advance=adv)


def _label(run: _Run, synthetic: list[Example], filtered: list[Example], fps: dict[str, str],
           teacher: _Teacher) -> tuple[list[Example], list[Example] | None]:
    unfiltered = None
    if Baseline.UNFILTERED in run.o.baselines:
        upath = run.work / "labelled_unfiltered.jsonl"
        run.stage("labelled_unfiltered", fps["labelled_unfiltered"], upath,
                  lambda: write_examples(upath, teacher.label(synthetic, "all synthetic inputs")))
        unfiltered = read_examples(upath)
    path = run.work / "labelled.jsonl"

    def go() -> None:
        if unfiltered is not None:  # the filtered inputs are a subset: reuse their labels
            answers = {e.input: e.output for e in unfiltered}
            out = [replace(e, output=answers[e.input]) for e in filtered if e.input in answers]
            if len(out) == len(filtered):
                write_examples(path, out)
                return
        write_examples(path, teacher.label(filtered, "filtered inputs"))

    run.stage("labelled", fps["labelled"], path, go)
    return read_examples(path), unfiltered


def _record(run: _Run, kind: str, data: list[Example], losses: list[float],
            disc_path: Path | None) -> dict[str, Any]:
    c = run.result.counts
    filt = run.o.filter
    return {"kind": kind, "task": run.o.task, "source_model": run.source.spec,
            "adapter": str(run.adapter), "target_model": run.target.spec,
            "seeds": len(run.seeds),
            "synthetic_before_filter": c.get("synthetic_before_filter") if kind != "seeds" else 0,
            "synthetic_after_filter": (c.get("synthetic_after_filter") if kind == "transfer"
                                       else len(data) if kind == "unfiltered" else 0),
            "filter": (f"keep top {filt.keep_top:g}" if filt.keep_top is not None
                       else f"threshold {filt.threshold:g}" if filt.threshold is not None
                       else "discriminator's threshold") if disc_path else "none",
            "discriminator": str(disc_path) if disc_path else None,
            "train_examples": len(data), "training": options_dict(run.o.student),
            "prompt_template": run.o.prompt.template,
            "teacher_prompt_template": (run.o.teacher_prompt or run.o.prompt).template,
            "final_loss": losses[-1] if losses else None, "losses": losses,
            "command": run.o.command}


def _train(run: _Run, kind: str, data: list[Example], out: Path, force: bool,
           disc_path: Path | None) -> None:
    model, tok = run.target_model()
    with run.progress(f"training {kind} adapter (target model)", run.o.student.steps) as adv:
        peft_model, losses = train_student(model, tok, data, run.o.prompt, run.o.student,
                                           advance=adv)
    record = _record(run, kind, data, losses, disc_path)
    try:
        save_student(peft_model, out, base_model=run.target.spec, card=model_card(record),
                     record=record, force=force)
    finally:
        run._target_model = (peft_model.unload(), tok)  # the bare target model again


def copy_shapes_match(adapter: Path, model) -> str | None:
    """``None`` when every module of ``adapter`` exists in ``model`` with the same weight shape,
    else the first reason it does not.

    Example:
        >>> copy_shapes_match("adapter_dir", target_model)          # doctest: +SKIP
        "module 'model.layers.0.self_attn.q_proj': adapter update is (576, 576) but ..."
    """
    import torch

    from lorakit.api import load

    shapes = {name: tuple(m.weight.shape) for name, m in model.named_modules()
              if isinstance(getattr(m, "weight", None), torch.Tensor)}
    for key, mod in load(adapter).modules.items():
        want = (mod.up.shape[0], mod.down.shape[1])  # (out, in) of B @ A
        got = shapes.get(key)
        if got is None:
            return f"module {key!r} is not in the target model"
        if tuple(got[:2]) != want:
            return f"module {key!r}: adapter update is {want} but the target weight is {got}"
    return None


def _copy(run: _Run, out: Path, force: bool) -> str:
    from lorakit.api import load, save

    model, _ = run.target_model()
    why = copy_shapes_match(run.adapter, model)
    if why is not None:
        return f"skipped: {why}"
    a = load(run.adapter)
    a.base_model = run.target.spec
    a.config = {**a.config, "base_model_name_or_path": run.target.spec}
    save(a, out, "peft", force=force, provenance={"command": run.o.command,
                                                  "sources": [str(run.adapter)]})
    return str(out)


def _baselines(run: _Run, unfiltered: list[Example] | None, fps: dict[str, str],
               disc_path: Path | None) -> None:
    bdir = run.work / "baselines"
    for b in run.o.baselines:
        out = bdir / b.value
        fp = fps[f"baseline_{b.value}"]
        if b is Baseline.COPY:
            if run.done("baseline_copy", fp, out):
                run.result.baselines[b.value] = str(out)
                run.result.stages["baseline_copy"] = "resumed"
                continue
            started = time.monotonic()
            run.result.baselines[b.value] = _copy(run, out, force=True)
            if out.exists():
                run.mark("baseline_copy", fp, "ran", started)
            continue
        data = run.seeds if b is Baseline.SEEDS else _unfiltered_data(run, unfiltered or [])
        run.stage(f"baseline_{b.value}", fp, out,
                  lambda data=data, out=out, b=b: _train(run, b.value, data, out, True,
                                                         disc_path if b is not Baseline.SEEDS
                                                         else None))
        run.result.baselines[b.value] = str(out)


def _unfiltered_data(run: _Run, unfiltered: list[Example]) -> list[Example]:
    """The unfiltered baseline's training set (see :class:`UnfilteredSize`)."""
    if run.o.unfiltered_size is UnfilteredSize.ALL:
        return unfiltered
    return unfiltered[:run.result.counts.get("synthetic_after_filter", len(unfiltered))]


def _fingerprints(run: _Run, disc_path: Path | None) -> dict[str, str]:
    o = run.o
    fps = _records_fp(run)
    disc = _file_digest(disc_path) if disc_path else None
    fps["filtered"] = _digest(["filtered", fps["synthetic"], disc, asdict(o.filter),
                               o.discriminator_model])
    teacher = _digest([run.source.spec, _file_digest(run.adapter),
                       asdict(o.teacher_prompt or o.prompt), asdict(o.label)])
    fps["labelled_unfiltered"] = _digest(["lu", fps["synthetic"], teacher])
    fps["labelled"] = _digest(["l", fps["filtered"], teacher])
    student = _digest([run.target.spec, options_dict(o.student), asdict(o.prompt)])
    fps["baseline_seeds"] = _digest(["bs", fps["seeds"], student])
    fps["baseline_unfiltered"] = _digest(["bu", fps["labelled_unfiltered"], student,
                                          o.unfiltered_size.value, fps["filtered"]])
    fps["baseline_copy"] = _digest(["bc", _file_digest(run.adapter), run.target.spec])
    return fps


def transfer(source_model: str | Path, adapter: str | Path, target_model: str | Path,
             seeds: str | Path, out: str | Path, *, discriminator: str | Path | None = None,
             work_dir: str | Path | None = None, options: TransferOptions = TransferOptions(),
             force: bool = False) -> TransferResult:
    """Move ``adapter`` from ``source_model`` to ``target_model`` (Trans-LoRA).

    Writes a PEFT folder at ``out`` (never over an existing one without ``force``) and keeps every
    stage's output in ``work_dir`` (default ``<out>.work``), from which a rerun resumes.

    Example:
        >>> transfer("HuggingFaceTB/SmolLM2-135M-Instruct", "add_adapter", "gemma.gguf",
        ...          "seeds.jsonl", "add_on_gemma", discriminator="disc_add",
        ...          options=TransferOptions(task="add"))                # doctest: +SKIP
    """
    require_extra()
    out = Path(out)
    check_output(out, force)
    source = replace(ModelRef.parse(source_model), alias=options.source_name)
    target = ModelRef.parse(target_model)
    adapter = Path(adapter)
    if options.check_base:
        check_adapter_base(adapter, source)
    else:
        adapter_config(adapter)
    seed_examples = read_examples(seeds, min_count=options.num_seeds)[:options.num_seeds]
    disc_path = Path(discriminator) if discriminator is not None else None
    if disc_path is not None:
        if options.task is None:
            raise OptionError("--task is needed with --discriminator (it must match the task "
                              "the discriminator was trained for)")
        Discriminator.read_meta(disc_path, options.task)
    work = Path(work_dir) if work_dir is not None else out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    result = TransferResult(output=out, work_dir=work)
    run = _Run(source, adapter, target, seed_examples, work, options, result)
    fps = _fingerprints(run, disc_path)

    synthetic = _synthesize(run, fps["synthetic"])
    filtered = _filter(run, synthetic, disc_path, fps["filtered"])
    result.counts.update(seeds=len(seed_examples), synthetic_before_filter=len(synthetic),
                         synthetic_after_filter=len(filtered))
    teacher = _Teacher(run)
    labelled, unfiltered = _label(run, synthetic, filtered, fps, teacher)
    teacher.pair = None
    gc.collect()
    result.counts["labelled"] = len(labelled)
    started = time.monotonic()
    _train(run, "transfer", labelled, out, force, disc_path)
    result.stages["train"] = "ran"
    result.seconds["train"] = round(time.monotonic() - started, 2)
    _baselines(run, unfiltered, fps, disc_path)
    with atomic_output(work / "report.json", force=True) as tmp:
        tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result
