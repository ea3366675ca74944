"""Batch jobs over collections: one output per input, in a local process pool or on Ray.

A command given many sources (paths, globs, a collection folder, a manifest, ``hf://`` URIs; see
:mod:`lorakit.sources`) runs one *job* per source and writes ``OUT_DIR/<name>``: the folder name
of a folder input, the file stem of a file input (``.safetensors`` kept for kohya/diffusers
output), ``repo--subfolder`` for a Hub source.

* Executors: inline (``--jobs 1``), a local process pool (``--jobs N``, ``cores / N`` torch
  threads per worker; single-threaded workers are forked from this process, others from a fresh
  server process) or Ray tasks (``--executor ray [--address ...] [--chunk N]``, extra ``ray``;
  one CPU per task, several jobs per task: :mod:`lorakit.cluster`). Every executor runs the same
  :func:`run_job`, so outputs are byte-identical whichever runs them (for kohya/diffusers files,
  whose safetensors metadata the writer orders by hash, the tensors and metadata are identical,
  not the header's key order).
* Planned whole: :func:`plan_jobs` checks every job and the report before any runs (no output
  may be, hold or lie inside any input of the batch; see README "Output safety").
* Resumable: each finished job leaves a record ``OUT_DIR/.lorakit-batch/<output>.json`` with the
  sha256 of the input's adapter files (config and weights) and of the job's options, and the
  size and modification time (ns) of each file the job wrote. A rerun skips a job whose output
  exists and whose record matches all three; an output without a matching record, or changed
  since, is refused without ``--force`` (and redone with it). Each output is written in a locked
  staging folder (``.lorakit-batch/staging``), its record written, and then it is put in place
  by :func:`lorakit.outputs.install` (an existing folder gets only the job's files), so a killed
  run leaves no partial output and no output without its record. A run starts by removing what
  killed runs left in staging (unlocked entries only: a concurrent run's survive), saying so.
* Failures: without ``keep_going`` the run stops at the first failed job (queued jobs are not
  started; jobs already running finish) and leaves no partial file; with it, every job runs and
  the summary lists each one's status, time and error (``--report`` as JSON or CSV).

Example:
    >>> from lorakit.sources import expand
    >>> jobs = plan_jobs("resize", expand(["loras/*.safetensors"]), "small",
    ...                  {"policy": {"rank": 4}})                                  # doctest: +SKIP
    >>> run_batch(jobs, BatchOptions(jobs=2)).counts()                            # doctest: +SKIP
    {'done': 12, 'skipped': 0, 'failed': 0, 'not run': 0}
"""

from __future__ import annotations

import contextlib
import csv
import enum
import hashlib
import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import (
    BatchError,
    LorakitError,
    OptionError,
    OutputExistsError,
)
from lorakit.formats.registry import FILE_LAYOUTS
from lorakit.sources import Source, SourcePlan, adapter_files, digest, is_hub, local_path

RECORD_DIR = ".lorakit-batch"
FILE_FORMATS = FILE_LAYOUTS  # layouts written as one .safetensors file


class Executor(str, enum.Enum):
    """Where batch jobs run."""

    LOCAL = "local"
    RAY = "ray"


class Status(str, enum.Enum):
    """What became of one job."""

    DONE = "done"
    SKIPPED = "skipped"  # finished by an earlier run with the same input and options
    FAILED = "failed"
    NOT_RUN = "not run"  # the run stopped at an earlier failure


@dataclass(frozen=True)
class BatchOptions:
    """How a batch runs (not what it computes: that is each job's ``options``).

    Fields:
        jobs: workers (local: processes, 1 = inline; Ray: CPUs of a local runtime, or at most
            this many tasks at once on a cluster). None: 1 locally, every core for a local Ray
            runtime, every CPU of a cluster.
        executor: local process pool or Ray.
        address: Ray cluster address (``host:6379``, ``auto``, ``ray://host:10001``); None
            starts a local one.
        keep_going: run every job even after failures.
        force: redo jobs whose output exists without a matching record.
        threads: torch threads per pool worker (None: cores / workers).
        chunk: Ray: jobs per Ray task (None: :func:`lorakit.cluster.default_chunk`).
    """

    jobs: int | None = None
    executor: Executor = Executor.LOCAL
    address: str | None = None
    keep_going: bool = False
    force: bool = False
    threads: int | None = None
    chunk: int | None = None

    def __post_init__(self) -> None:
        if self.jobs is not None and self.jobs < 1:
            raise OptionError(f"--jobs must be at least 1, got {self.jobs}")
        if self.chunk is not None and (self.chunk < 1 or Executor(self.executor) is not
                                       Executor.RAY):
            raise OptionError(f"--chunk needs --executor ray and at least 1, got {self.chunk}")
        if self.address and Executor(self.executor) is not Executor.RAY:
            raise OptionError("--address needs --executor ray")


@dataclass(frozen=True)
class Job:
    """One input to one output. ``source`` is what is loaded (an absolute path or ``hf://``),
    ``label`` the source as the user wrote it; ``options`` are JSON-ready task options."""

    task: str
    source: str
    label: str
    output: str
    options: dict[str, Any]
    provenance: dict[str, Any]

    @property
    def options_digest(self) -> str:
        blob = json.dumps({"task": self.task, "options": self.options}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class JobResult:
    """Status, wall and CPU time (of the process that ran it) and error (one line) of a job;
    ``detail`` holds task figures."""

    index: int
    source: str
    output: str
    status: Status
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    error: str | None = None
    error_type: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status.value
        return d


@dataclass
class BatchResult:
    """Every job's result (in input order) and the run's wall time.

    Example:
        >>> r = BatchResult([JobResult(0, "a", "o/a", Status.DONE, 1.0)], 1.5, "local", 1)
        >>> r.counts()["done"], r.ok
        (1, True)
    """

    results: list[JobResult]
    seconds: float
    executor: str
    workers: int

    def counts(self) -> dict[str, int]:
        return {s.value: sum(r.status is s for r in self.results) for s in Status}

    @property
    def failed(self) -> list[JobResult]:
        return [r for r in self.results if r.status is Status.FAILED]

    @property
    def ok(self) -> bool:
        return all(r.status in (Status.DONE, Status.SKIPPED) for r in self.results)

    def to_dict(self) -> dict[str, Any]:
        return {"executor": self.executor, "workers": self.workers, "seconds": self.seconds,
                "counts": self.counts(), "jobs": [r.to_dict() for r in self.results]}

    def write_report(self, path: str | Path, force: bool = False) -> Path:
        """JSON (the whole result) or, for a ``.csv`` name, one row per job; written atomically
        under the output rules (:func:`lorakit.outputs.write_text_output`: an existing file is
        replaced only with ``force``, a folder never, and the parent folder is not created)."""
        from lorakit.outputs import check_report, write_text_output

        path = Path(path)
        check_report(path, force)
        if path.suffix.lower() == ".csv":
            buf = io.StringIO()
            cols = ["index", "source", "output", "status", "seconds", "cpu_seconds", "error",
                    "error_type"]
            w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
            w.writeheader()
            for r in self.results:
                w.writerow({**r.to_dict(), "seconds": f"{r.seconds:.4f}",
                            "cpu_seconds": f"{r.cpu_seconds:.4f}"})
            text = buf.getvalue()
        else:
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        return write_text_output(path, text, force=force)


# ------------------------------------------------------------------------------------ tasks


def _dtype(name: str | None):
    import torch

    return getattr(torch, name) if name else None


def _task_resize(adapter, opts: dict[str, Any]):
    from lorakit.compress.resize import resize
    from lorakit.lowrank import RankPolicy

    out, report = resize(adapter, RankPolicy.from_options(**opts["policy"]),
                         device=opts.get("device", "auto"))
    return out, _totals(report.to_dict())


def _task_squeeze(adapter, opts: dict[str, Any]):
    from lorakit.compress.squeeze import SqueezeOptions, squeeze_with
    from lorakit.lowrank import RankPolicy

    out, report = squeeze_with(adapter, RankPolicy.from_options(**opts["policy"]),
                               SqueezeOptions(**opts["squeeze"]))
    return out, _totals(report.to_dict())


def _task_convert(adapter, opts: dict[str, Any]):
    from lorakit.formats import convert

    out = convert(adapter, opts["to"], component=opts.get("component"))
    return out, {"modules": len(out.modules)}


def _totals(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if not isinstance(v, (list, dict))}


# name -> (adapter, options) -> (new adapter, summary figures). Options are JSON-ready.
TASKS: dict[str, Callable[[Any, dict[str, Any]], tuple[Any, dict[str, Any]]]] = {
    "resize": _task_resize,
    "squeeze": _task_squeeze,
    "convert": _task_convert,
}


# ------------------------------------------------------------------------------------ plans


def output_name(source: Source, to: str | None) -> str:
    """The output's name under ``-o DIR``: file outputs keep ``.safetensors``.

    Example:
        >>> output_name(Source("x/a.safetensors", "a", True), None)
        'a.safetensors'
        >>> output_name(Source("x/a.safetensors", "a", True), "peft")
        'a'
    """
    file_out = to in FILE_FORMATS if to else source.is_file
    return f"{source.name}.safetensors" if file_out else source.name


def job_command(task: str, label: str, options: dict[str, Any]) -> str:
    """The single-adapter command equivalent to one job (recorded in the output's card). It
    leaves out ``-o`` and scheduling flags so the bytes do not depend on where a job ran.

    Example:
        >>> job_command("resize", "a", {"policy": {"rank": 4, "energy": None}, "to": "peft"})
        'lorakit resize a --rank 4 --to peft'
    """
    import shlex

    args = ["lorakit", task, label]
    flat: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    for key, value in flat.items():
        if value is None or value is False or (key == "device" and value == "auto"):
            continue
        args.append(f"--{key.replace('_', '-')}")
        if value is not True:
            args.append(str(value))
    return shlex.join(args)


def plan_jobs(task: str, plan: SourcePlan, out_dir: str | Path, options: dict[str, Any],
              provenance: dict[str, Any] | None = None, *, report: str | Path | None = None,
              force: bool = False) -> list[Job]:
    """One :class:`Job` per source, writing under ``out_dir``, with the whole plan checked
    before any job runs; all problems are reported together: an unknown task, ``out_dir`` a
    file, two sources with one output name, a hidden or reserved output name, an output that
    is, holds or lies inside any input of the batch (sources, the config beside a PEFT weights
    file, manifests), an output that would change kind (file / folder), and a ``report`` that
    breaks the output rules (:func:`lorakit.outputs.check_report`) or overlaps an output, an
    input or the record folder.

    Example:
        >>> plan_jobs("resize", expand(["loras"]), "small", {"policy": {"rank": 4}})  # doctest: +SKIP
    """
    from lorakit.outputs import InputIndex

    if task not in TASKS:
        raise OptionError(f"unknown batch task {task!r} (known: {', '.join(TASKS)})")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OptionError("with several sources, -o names a folder, but this is a file",
                          path=out_dir)
    problems: list[str] = []
    by_name: dict[str, list[str]] = {}
    jobs = []
    base = dict(provenance or {})
    inputs = batch_inputs(plan)
    index = InputIndex(inputs)
    for src in plan.sources:
        name = output_name(src, options.get("to"))
        by_name.setdefault(name, []).append(src.spec)
        out = (out_dir / name).absolute()
        source = src.spec if is_hub(src.spec) else str(Path(src.spec).absolute())
        problems += _output_problems(src.spec, name, out, index, options.get("to"))
        prov = {**base, "command": job_command(task, src.spec, options), "sources": [src.spec]}
        jobs.append(Job(task, source, src.spec, str(out), options, prov))
    for name, specs in by_name.items():
        if len(specs) > 1:
            problems.append(f"{', '.join(specs)} would all be written to {out_dir / name}")
    if report is not None:
        problems += _report_problems(Path(report), force, [Path(j.output) for j in jobs],
                                     index, out_dir)
    if problems:
        raise OptionError("cannot plan the batch: " + "; ".join(problems),
                          hint="rename or move inputs, or run them in separate batches")
    return jobs


def batch_inputs(plan: SourcePlan) -> list[Path]:
    """Every local path a batch reads: each source (file or folder), the files that make it up
    (a PEFT weights file's config beside it) and the manifests that listed them."""
    inputs: list[Path] = [Path(m) for m in plan.manifests]
    for src in plan.sources:
        if is_hub(src.spec):
            continue
        p = Path(src.spec)
        inputs.append(p)
        if p.exists():
            with contextlib.suppress(OSError):
                inputs += adapter_files(p)
    return inputs


def _output_problems(spec: str, name: str, out: Path, index: Any, to: str | None) -> list[str]:
    problems = []
    if name.startswith(".") or name in ("", RECORD_DIR):
        problems.append(f"{spec}: its output name {name!r} is hidden or reserved (lorakit's "
                        "records and temporaries start with a dot)")
    hit = index.conflict(out)
    if hit is not None:
        how, inp = hit
        what = {"is": "replace it" if Path(inp) == _resolved(spec) else f"replace the input {inp}",
                "holds": f"hold the input {inp}", "lies inside": f"lie inside the input {inp}"}
        problems.append(f"{spec}: its output {out} would {what[how]}; inputs are never modified")
    file_out = name.endswith(".safetensors") and (to in FILE_FORMATS if to else True)
    if os.path.lexists(out) and out.is_dir() == file_out:
        kind, other = ("a folder", "a file") if file_out else ("a file", "a folder")
        problems.append(f"{spec}: its output {out} is {kind} and would become {other}; lorakit "
                        "never replaces one kind by the other, --force or not")
    return problems


def _resolved(spec: str) -> Path:
    try:
        return Path(spec).resolve()
    except (OSError, RuntimeError):
        return Path(os.path.abspath(spec))


def _report_problems(report: Path, force: bool, outputs: list[Path], inputs: Any,
                     out_dir: Path) -> list[str]:
    from lorakit.outputs import check_report, overlapping

    problems = []
    records = (out_dir / RECORD_DIR).absolute()
    if overlapping(report, [records]) is not None:
        problems.append(f"the report {report} would lie in the record folder {records}")
    try:
        check_report(report, force, outputs=outputs, inputs=inputs)
    except LorakitError as e:
        problems.append(f"{e.path}: {e.problem}" + (f" ({e.hint})" if e.hint else ""))
    return problems


# ------------------------------------------------------------------------------------ one job


def record_path(output: Path) -> Path:
    """Where the record of the job writing ``output`` lives."""
    return output.parent / RECORD_DIR / f"{output.name}.json"


def output_files(output: Path, names: list[str] | None = None) -> dict[str, list[int]] | None:
    """``{name: [bytes, mtime_ns]}`` of an output's files (a file; a folder's top-level visible
    files, or the ``names`` given, relative to it): what a record keeps to tell that the output
    is still the one the batch wrote. ``None`` when the output (or one of ``names``) is missing.

    Example:
        >>> output_files(Path("/surely/missing")) is None
        True
    """
    def entry(p: Path) -> list[int]:
        st = p.stat()
        return [st.st_size, st.st_mtime_ns]

    try:
        if output.is_file():
            return {output.name: entry(output)}
        if output.is_dir():
            if names is None:
                names = sorted(p.name for p in output.iterdir()
                               if p.is_file() and not p.name.startswith("."))
            return {n: entry(output / n) for n in names}
    except OSError:
        return None
    return None


def _record_matches(rec: dict[str, Any], out: Path) -> bool:
    """The recorded files of ``out`` are all there, with the recorded size and mtime (files a
    user added beside them do not count)."""
    want = rec.get("output_files")
    if not isinstance(want, dict) or not want:
        return False
    if out.is_dir() != bool(rec.get("is_dir", out.is_dir())):
        return False
    names = None if out.is_file() else sorted(want)
    return output_files(out, names) == want


def _read_record(output: Path) -> dict[str, Any] | None:
    try:
        rec = json.loads(record_path(output).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def _write_record(output: Path, record: dict[str, Any]) -> None:
    """Write a job's record atomically (a fresh temporary in the record folder, then renamed)."""
    from lorakit.outputs import new_temp

    path = record_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = new_temp(path, is_dir=False, parent=path.parent)
    try:
        temp.path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n",
                             encoding="utf-8")
        os.chmod(temp.path, 0o644)
        os.replace(temp.path, path)
    finally:
        temp.discard()


def clean_staging(out_dir: Path) -> list[Path]:
    """Remove what killed runs left in ``out_dir``'s staging folder (each entry is locked while
    its job runs, so a concurrent run's staging survives); say so for each."""
    from lorakit.outputs import is_temp_name, notice, remove_if_unlocked

    root = Path(out_dir) / RECORD_DIR / "staging"
    removed = []
    try:
        names = sorted(n for n in os.listdir(root) if is_temp_name(n))
    except OSError:
        return removed
    for name in names:
        if remove_if_unlocked(root / name):
            removed.append(root / name)
            notice(f"removed {root / name}, what an interrupted batch left in staging")
    return removed


@contextlib.contextmanager
def _staging(output: Path):
    """A private, locked folder beside the outputs (under the record folder), removed after."""
    from lorakit.outputs import new_temp

    root = output.parent / RECORD_DIR / "staging"  # removed by run_batch when the run ends
    root.mkdir(parents=True, exist_ok=True)
    temp = new_temp(output, is_dir=True, parent=root)
    try:
        yield temp.path
    finally:
        temp.discard()


def _move_into_place(staged: Path, out: Path, replace: bool, plan: Any = None) -> None:
    """Put ``staged`` in place as ``out`` under the output rules (:func:`lorakit.outputs.install`:
    an existing folder gets only the job's files; nothing else in it is touched)."""
    from lorakit.outputs import install

    install(staged, out, force=replace, is_dir=staged.is_dir(), plan=plan)


def _installed_names(staged: Path, out: Path) -> tuple[list[str] | None, Any]:
    """The output's files this job puts in place (relative to a folder output) and the install
    plan for an existing folder."""
    from lorakit.outputs import plan_install

    if not staged.is_dir():
        return None, None
    if out.is_dir():
        plan = plan_install(staged, out)
        return sorted(n for n in plan.put if (staged / n).is_file()), plan
    return sorted(p.name for p in staged.iterdir() if p.is_file()), None


def finished(job: Job) -> bool:
    """Whether ``job``'s output is in place with a record matching its input, options and files
    (what a rerun skips). False where the input cannot be hashed here (an ``hf://`` source
    not in this machine's cache).

    Example:
        >>> finished(jobs[0])                       # doctest: +SKIP
        True
    """
    out = Path(job.output)
    try:
        local = local_path(job.source)
        if not os.path.lexists(out) or not local.exists():
            return False
        rec = _read_record(out)
        return bool(rec and rec.get("input_sha256") == digest(adapter_files(local))
                    and rec.get("options_sha256") == job.options_digest
                    and _record_matches(rec, out))
    except (LorakitError, OSError):
        return False


def run_job(job: Job, force: bool = False, index: int = 0) -> JobResult:
    """Run one job in this process: skip it when its record matches, else load, transform,
    write atomically and record. Never raises for a bad input: the result says ``failed``.

    Example:
        >>> run_job(jobs[0]).status                  # doctest: +SKIP
        <Status.DONE: 'done'>
    """
    from lorakit.formats import save_adapter
    from lorakit.sources import load_source

    t0, c0 = time.perf_counter(), time.process_time()
    out = Path(job.output)
    result = JobResult(index, job.label, job.output, Status.FAILED)
    try:
        local = local_path(job.source)
        in_digest = digest(adapter_files(local)) if local.exists() else None
        opt_digest = job.options_digest
        replace = False
        if os.path.lexists(out):
            rec = _read_record(out)
            if (rec and in_digest and rec.get("input_sha256") == in_digest
                    and rec.get("options_sha256") == opt_digest and _record_matches(rec, out)):
                result.status = Status.SKIPPED
                return result
            if not force:
                same_job = bool(rec and in_digest and rec.get("input_sha256") == in_digest
                                and rec.get("options_sha256") == opt_digest)
                what = ("was changed since the batch wrote it" if same_job else
                        "exists but no batch record matches its input and options")
                raise OutputExistsError(f"output {what}", path=out,
                                        hint="pass --force to redo it")
            replace = True
        adapter = load_source(job.source, local=local)
        new, result.detail = TASKS[job.task](adapter, job.options)
        with _staging(out) as stage:
            # written and hashed aside, recorded, then renamed into place: a killed run leaves
            # either no output or a complete output with its record
            staged = stage / out.name
            save_adapter(new, staged, job.options.get("to"),
                         dtype=_dtype(job.options.get("dtype")), provenance=job.provenance)
            names, plan = _installed_names(staged, out)
            record = {"source": job.label, "output": out.name, "task": job.task,
                      "input_sha256": in_digest, "options_sha256": opt_digest,
                      "options": job.options, "is_dir": staged.is_dir(),
                      "output_files": output_files(staged, names),
                      "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            _write_record(out, record)
            _move_into_place(staged, out, replace, plan)
        result.status = Status.DONE
    except LorakitError as e:
        result.error, result.error_type = str(e), type(e).__name__
    except Exception as e:  # noqa: BLE001 - an unexpected failure is still reported per job
        result.error, result.error_type = f"{type(e).__name__}: {e}", type(e).__name__
    finally:
        result.seconds = time.perf_counter() - t0
        result.cpu_seconds = time.process_time() - c0
    return result


# ------------------------------------------------------------------------------------ executors


def run_batch(jobs: list[Job], options: BatchOptions | None = None,
              on_result: Callable[[JobResult], None] | None = None) -> BatchResult:
    """Run ``jobs`` with the chosen executor; ``on_result`` sees each result as it arrives.

    Example:
        >>> run_batch(jobs, BatchOptions(jobs=2, keep_going=True)).counts()   # doctest: +SKIP
    """
    options = options or BatchOptions()
    results = [JobResult(i, j.label, j.output, Status.NOT_RUN) for i, j in enumerate(jobs)]
    parents = {Path(j.output).parent for j in jobs}
    for parent in parents:
        clean_staging(parent)

    def take(r: JobResult) -> None:
        results[r.index] = r
        if on_result:
            on_result(r)

    t0 = time.perf_counter()
    if Executor(options.executor) is Executor.RAY:
        workers = _run_ray(jobs, options, take)
    elif (options.jobs or 1) <= 1 or len(jobs) <= 1:
        workers = 1
        for i, job in enumerate(jobs):
            r = run_job(job, options.force, i)
            take(r)
            if r.status is Status.FAILED and not options.keep_going:
                break
    else:
        workers = _run_pool(jobs, options, take)
    for parent in parents:
        with contextlib.suppress(OSError):
            (parent / RECORD_DIR / "staging").rmdir()  # empty once every job has finished
    return BatchResult(results, time.perf_counter() - t0, Executor(options.executor).value,
                       workers)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _run_pool(jobs: list[Job], options: BatchOptions,
              take: Callable[[JobResult], None]) -> int:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    workers = min(options.jobs or 1, len(jobs))
    threads = options.threads or max(1, (os.cpu_count() or 1) // workers)
    # One torch thread per worker (as many workers as cores): fork this process, which has
    # everything imported, so workers start at once; a single-threaded worker never enters an
    # OpenMP parallel region, so the OpenMP state a fork inherits is never used (the rule
    # PyTorch's DataLoader workers follow). Several threads per worker: fork a fresh server
    # process that imported lorakit and torch once. Without either (Windows): spawn.
    methods = multiprocessing.get_all_start_methods()
    if threads == 1 and "fork" in methods:
        ctx = multiprocessing.get_context("fork")
    elif "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["lorakit.batch", "lorakit.compress.resize"])
    else:  # pragma: no cover
        ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(run_job, job, options.force, i): i for i, job in enumerate(jobs)}
        try:
            _collect(futures, jobs, options, take)
        except KeyboardInterrupt:  # Ctrl-C: stop now; no partial output is ever in place
            _stop_pool(pool)
            raise
    return workers


def _stop_pool(pool: Any) -> None:
    """Cancel the queued jobs and end the workers, including those that already took a job
    from the pool's queue (their staging folders, unlocked then, are removed by the next run)."""
    procs = list((getattr(pool, "_processes", None) or {}).values())  # shutdown forgets them
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.terminate()
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.join(timeout=10)


def _collect(futures: dict, jobs: list[Job], options: BatchOptions,
             take: Callable[[JobResult], None]) -> None:
    """Take each pool result as it arrives; stop queued jobs at the first failure."""
    from concurrent.futures import CancelledError, as_completed
    from concurrent.futures.process import BrokenProcessPool

    stop = False
    for fut in as_completed(futures):
        i = futures[fut]
        try:
            r = fut.result()
        except CancelledError:
            continue
        except BrokenProcessPool as e:
            r = JobResult(i, jobs[i].label, jobs[i].output, Status.FAILED,
                          error=f"worker process died ({e})", error_type="BrokenProcessPool")
        take(r)
        if r.status is Status.FAILED and not options.keep_going and not stop:
            stop = True
            for f in futures:
                f.cancel()  # queued jobs never start; running ones finish (atomically)


def _run_ray(jobs: list[Job], options: BatchOptions,
             take: Callable[[JobResult], None]) -> int:
    from lorakit.cluster import run_ray  # chunked tasks, local runtime or --address cluster

    return run_ray(jobs, options, take)


# ------------------------------------------------------------------------------------ display


class Progress:
    """A rich progress bar over jobs on stderr (per-job lines on a TTY); no-op when disabled."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self._bar: Any = None

    def __enter__(self) -> Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TimeElapsedColumn(),
                                     console=Console(stderr=True), transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task("jobs", total=self.total)
        return self

    def __call__(self, r: JobResult) -> None:
        if self._bar is None:
            return
        mark = {Status.DONE: "[green]done", Status.SKIPPED: "[cyan]skipped",
                Status.FAILED: "[red]failed"}.get(r.status, r.status.value)
        tail = f": {r.error}" if r.error else ""
        self._bar.console.print(f"{mark}[/] {r.source} ({r.seconds:.2f}s){tail}",
                                highlight=False, markup=True)
        self._bar.update(self._task, advance=1, description=f"jobs (last: {Path(r.output).name})")

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


def print_summary(result: BatchResult, console) -> None:
    """A table of every job (status, time, output or error) and the counts."""
    from rich.table import Table

    table = Table(title=f"batch: {len(result.results)} jobs, {result.executor} x"
                        f"{result.workers}, {result.seconds:.1f}s")
    for col in ("#", "source", "status", "seconds", "output / error"):
        table.add_column(col, overflow="fold")
    style = {Status.DONE: "green", Status.SKIPPED: "cyan", Status.FAILED: "red"}
    for r in result.results:
        table.add_row(str(r.index), r.source, f"[{style.get(r.status, 'yellow')}]"
                      f"{r.status.value}[/]", f"{r.seconds:.2f}", r.error or r.output)
    console.print(table)
    console.print(", ".join(f"{n} {k}" for k, n in result.counts().items() if n))


def run_command(task: str, plan: SourcePlan, out_dir: str | Path, options: dict[str, Any], *,
                batch: BatchOptions, report: str | Path | None = None, quiet: bool = False,
                as_json: bool = False, provenance: dict[str, Any] | None = None) -> BatchResult:
    """What the CLI runs for a command given a collection: plan, run with progress, print the
    summary (or JSON), write ``report``; raise :class:`BatchError` when a job failed.

    Example:
        >>> run_command("convert", expand(["loras"]), "peft_out", {"to": "peft"},
        ...             batch=BatchOptions(jobs=2))                          # doctest: +SKIP
    """
    import sys

    from rich.console import Console

    jobs = plan_jobs(task, plan, out_dir, options, provenance, report=report,
                     force=batch.force)
    show = not (quiet or as_json)
    with Progress(len(jobs), show and sys.stderr.isatty()) as bar:
        result = run_batch(jobs, batch, on_result=bar)
    if report:
        result.write_report(report, force=batch.force)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    elif show:
        print_summary(result, Console(soft_wrap=False,
                                      width=None if sys.stdout.isatty() else 160))
    if not result.ok:
        failed = result.failed
        first = failed[0] if failed else None
        stopped = "" if batch.keep_going else " (stopped at the first failure; rerun to resume)"
        raise BatchError(f"{len(failed)} of {len(jobs)} jobs failed{stopped}; first: "
                         f"{first.source if first else '?'}: {first.error if first else ''}",
                         path=str(out_dir))
    return result


__all__ = ["Executor", "Status", "BatchOptions", "Job", "JobResult", "BatchResult", "TASKS",
           "plan_jobs", "run_job", "run_batch", "run_command", "output_name", "job_command",
           "record_path", "finished"]
