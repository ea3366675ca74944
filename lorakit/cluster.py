"""Batch jobs as Ray tasks: a local Ray runtime or a running cluster (``--address``).

:func:`run_ray` is what :func:`lorakit.batch.run_batch` calls for ``--executor ray``.

* Connecting: ``--address host:port`` (what ``ray start --head`` prints), ``auto`` (the cluster
  started on this machine) or ``ray://host:10001`` (Ray Client). A ``host:port`` that nothing
  answers fails at once, not after Ray's own retries. A cluster with token authentication (the
  default of ``ray start --head`` in recent Ray once ``~/.ray/auth_token`` exists) needs
  ``RAY_AUTH_MODE=token`` and the token (``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``) in the
  driver's environment, as every Ray driver does. Without ``--address`` a local runtime is started
  with ``--jobs`` CPUs (every core by default) and stopped at the end. When the caller already
  called ``ray.init``, that connection is used as it is (and its runtime environment must make
  lorakit importable, e.g. ``runtime_env={"py_modules": [lorakit]}``). On a cluster, ``--jobs N``
  keeps at most N tasks (CPUs) busy at once, to share the cluster; by default all of its CPUs.
* Shipping: connecting to a cluster, the job's runtime environment carries this process's
  ``lorakit`` package (``py_modules``), so workers run exactly the driver's code and need nothing
  of lorakit installed; they need Python with Ray and lorakit's dependencies (torch, safetensors,
  numpy, scipy, scikit-learn, huggingface_hub, threadpoolctl, click, rich, pyyaml).
* Chunks: each Ray task runs ``chunk`` consecutive jobs (default :func:`default_chunk`) and
  streams the finished jobs' results back in groups, at most every :data:`FLUSH_S` seconds (a
  streaming generator task); results, records and the report stay per source. One CPU per task, one torch thread per CPU. While the run owns
  the Ray session, ``sys.stdout`` is redirected to stderr: Ray's driver prints cluster events
  (a task retried, a node dead) on stdout, which would corrupt ``--json``.
* Failures: a worker or node that dies takes only its running job with it (outputs are written
  aside and renamed into place, so no finished output is lost); Ray retries the chunk
  (:data:`RETRIES` times, ``LORAKIT_RAY_RETRIES``) on a live node, where the jobs already done are
  skipped by their records. A chunk that still fails reports its unfinished jobs failed, except
  those whose output is in place and recorded (finished before their result was sent: done). A cluster
  left without CPUs fails the jobs still queued after :data:`NO_CPU_TIMEOUT_S`
  (``LORAKIT_RAY_NO_CPU_TIMEOUT``) instead of waiting forever. Without
  ``keep_going`` the first failed job stops the run: the driver creates a stop file in the output
  folder's staging area, which every chunk checks before each job, so queued chunks end without
  running a job and running ones after their current job (whose result is still reported).

Example:
    >>> from lorakit.batch import BatchOptions, Executor, run_batch
    >>> run_batch(jobs, BatchOptions(executor=Executor.RAY, address="10.0.0.1:6379",
    ...                               chunk=16)).counts()                     # doctest: +SKIP
    {'done': 500, 'skipped': 0, 'failed': 0, 'not run': 0}
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.errors import ClusterError, MissingDependencyError, OptionError

if TYPE_CHECKING:  # pragma: no cover
    from lorakit.batch import BatchOptions, Job, JobResult

# Measured by bench/batch.py (resize of a GPT-2-sized rank-8 adapter, 2 CPUs): a Ray task costs
# 12-28 ms of scheduling and transfer on top of a 8-13 ms job. With 32-64 jobs per task that is
# a few % of the work; four chunks per CPU keep the CPUs balanced to the end and bound what a lost
# node has to redo.
MAX_CHUNK = 64
CHUNKS_PER_CPU = 4
RETRIES = 3  # Ray retries of a chunk whose worker or node died (not of failed jobs)
NO_CPU_TIMEOUT_S = 120.0  # a cluster without CPUs for this long fails the jobs still queued
POLL_S = 2.0
# A chunk reports its finished jobs in groups, at most this often: one Ray object per job cost
# about 2 ms of CPU per job (measured: 15 % of a 13 ms resize), one per group a fraction of that
FLUSH_S = 0.5
CONNECT_TIMEOUT_S = 10.0


def _setting(name: str, default: float) -> float:
    """``LORAKIT_RAY_RETRIES`` / ``LORAKIT_RAY_NO_CPU_TIMEOUT`` override the defaults above."""
    value = os.environ.get(f"LORAKIT_RAY_{name}")
    try:
        return float(value) if value else default
    except ValueError:
        raise OptionError(f"LORAKIT_RAY_{name} must be a number, got {value!r}") from None


def default_chunk(n_jobs: int, cpus: int) -> int:
    """Jobs per Ray task: as many as keep every CPU busy with :data:`CHUNKS_PER_CPU` chunks, at
    most :data:`MAX_CHUNK` (the per-task overhead is then a few % of a chunk's work).

    Example:
        >>> default_chunk(500, 2), default_chunk(10_000, 64), default_chunk(20, 2)
        (63, 40, 3)
    """
    return max(1, min(MAX_CHUNK, math.ceil(n_jobs / (CHUNKS_PER_CPU * max(1, cpus)))))


def shipped_runtime_env() -> dict[str, Any]:
    """The runtime environment that carries this process's lorakit package to the workers.

    Example:
        >>> shipped_runtime_env()["py_modules"][0].endswith("lorakit")
        True
    """
    return {"py_modules": [str(Path(__file__).resolve().parent)],
            "excludes": ["__pycache__", "*.pyc"]}


def _import_ray():
    try:
        import ray
    except ImportError as e:
        raise MissingDependencyError("--executor ray needs Ray, which is not installed",
                                     hint="pip install 'lorakit[ray]'") from e
    return ray


def _probe(address: str) -> None:
    """Fail at once when nothing listens at a ``host:port`` (or ``ray://host:port``) address:
    Ray itself retries such a connection for minutes."""
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", "local" or a form Ray resolves itself
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise ClusterError(f"no Ray cluster answers at {address} ({e.strerror or e})",
                           hint="pass the address `ray start --head` printed, e.g. "
                                "--address 10.0.0.1:6379") from None


def connect(ray, options: BatchOptions) -> bool:
    """Connect to ``options.address`` (shipping lorakit) or start a local runtime; False when
    the caller's connection is used. Errors name the address."""
    if ray.is_initialized():
        return False
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                          "logging_level": logging.WARNING}
    if not options.address:
        ray.init(num_cpus=options.jobs or os.cpu_count() or 1, **kw)
        return True
    _probe(options.address)
    try:
        ray.init(address=options.address, runtime_env=shipped_runtime_env(), **kw)
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as e:
        raise ClusterError(f"cannot connect to the Ray cluster at {options.address}: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}",
                           hint="with token authentication set RAY_AUTH_MODE=token and "
                                "RAY_AUTH_TOKEN (or ~/.ray/auth_token)") from None
    return True


def run_chunk(items: list[tuple[int, Job]], force: bool, keep_going: bool,
              stop: str | None = None) -> Iterator[list[JobResult]]:
    """Run ``(index, job)`` pairs in order in this process, yielding the finished results in
    groups: at most every :data:`FLUSH_S` seconds, at once after a failure, and at the end. Stop
    after a failure unless ``keep_going``, and before any job once the file ``stop`` exists (the
    driver creates it at the first failure of the run). What a Ray task runs.

    Each job writes its output and its record before its result is yielded, so a worker that dies
    holding unreported results loses no output: the retried chunk, or the rerun, skips those jobs.

    Example:
        >>> groups = run_chunk([(0, jobs[0]), (1, jobs[1])], False, False)  # doctest: +SKIP
        >>> [[r.status.value for r in g] for g in groups]  # doctest: +SKIP
        [['done', 'done']]
    """
    from lorakit.batch import Status, run_job

    group: list[JobResult] = []
    last = time.monotonic()
    for index, job in items:
        if stop and os.path.exists(stop):
            break
        result = run_job(job, force, index)
        group.append(result)
        failed = result.status is Status.FAILED
        if failed or time.monotonic() - last >= FLUSH_S:
            yield group
            group, last = [], time.monotonic()
        if failed and not keep_going:
            return
    if group:
        yield group


def _chunks(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


class _Drain:
    """Collects streamed results from the chunk tasks: one result per job (the first: a retried
    chunk reports again the jobs it finds done), failures for the jobs of a chunk that died."""

    def __init__(self, ray, jobs: list[Job], options: BatchOptions,
                 take: Callable[[JobResult], None], stop: Path) -> None:
        self.ray, self.jobs, self.options, self.take = ray, jobs, options, take
        self.stop = stop
        self.seen: set[int] = set()
        self.stopped = False
        self.no_cpu_timeout = _setting("NO_CPU_TIMEOUT", NO_CPU_TIMEOUT_S)

    def result(self, r: JobResult) -> None:
        from lorakit.batch import Status

        if r.index in self.seen:
            return
        self.seen.add(r.index)
        self.take(r)
        if r.status is Status.FAILED and not self.options.keep_going and not self.stopped:
            # chunks check this file before each job: queued ones end at once, running ones
            # after their current job, whose result still arrives (ray.cancel would drop it)
            self.stopped = True
            self.stop.parent.mkdir(parents=True, exist_ok=True)
            self.stop.touch()

    def fail(self, chunk: list[int], error: str, error_type: str) -> None:
        """The chunk's task died: its jobs not yet reported are failed, except those whose
        output is in place and recorded (finished, their group not yet sent: done)."""
        from lorakit.batch import JobResult, Status, finished

        for i in chunk:
            if i not in self.seen:
                job = self.jobs[i]
                if finished(job):
                    self.result(JobResult(i, job.label, job.output, Status.DONE))
                elif not self.stopped:
                    self.result(JobResult(i, job.label, job.output, Status.FAILED, error=error,
                                          error_type=error_type))

    def run(self, chunks: list[list[int]], submit: Callable[[list[int]], Any],
            limit: int | None = None) -> None:
        """Submit ``chunks`` (at most ``limit`` tasks at once; none once stopped) and take their
        results until every task has ended."""
        ray = self.ray
        queue = collections.deque(chunks)
        gens: dict[Any, list[int]] = {}
        pending: list[Any] = []
        quiet_since = time.monotonic()
        while queue or pending:
            while queue and not self.stopped and (limit is None or len(pending) < limit):
                chunk = queue.popleft()
                gen = submit(chunk)
                gens[gen] = chunk
                pending.append(gen)
            if not pending:
                return  # stopped: the chunks never submitted stay "not run"
            ready, pending = ray.wait(pending, num_returns=1, timeout=POLL_S)
            if not ready:
                if self._no_cpus(quiet_since):
                    error = (f"no CPUs left in the Ray cluster for {self.no_cpu_timeout:.0f}s "
                             "(its nodes died or left)")
                    for gen in pending:
                        ray.cancel(gen)
                    for chunk in [gens[g] for g in pending] + list(queue):
                        self.fail(chunk, error, "ClusterError")
                    return
                continue
            quiet_since = time.monotonic()
            for gen in ready:
                if self._next(gen, gens[gen]):
                    pending.append(gen)

    def _next(self, gen, chunk: list[int]) -> bool:
        """Take the generator's next result; False once it is exhausted or failed."""
        ray = self.ray
        try:
            ref = next(gen)
        except StopIteration:
            return False
        try:
            got = ray.get(ref)  # a group of results (run_chunk), or one
            for r in got if isinstance(got, list) else [got]:
                self.result(r)
        except ray.exceptions.TaskCancelledError:
            return False
        except ray.exceptions.RayError as e:
            self.fail(chunk, f"Ray task failed: {_first_line(e)}", type(e).__name__)
            return False
        return True

    def _no_cpus(self, quiet_since: float) -> bool:
        if time.monotonic() - quiet_since < self.no_cpu_timeout:
            return False
        return self.ray.cluster_resources().get("CPU", 0) < 1


def _first_line(e: BaseException) -> str:
    """What went wrong, in one line: the cause of an exception raised inside the task (an import
    error on a worker without lorakit's dependencies), else Ray's first line (a dead node)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException) and cause is not e:
        return f"{type(cause).__name__}: {_first_line(cause)}"
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _stop_path(jobs: list[Job]) -> Path:
    """A name for this run's stop file in the first output folder's staging area (on the file
    system the workers share; staging is cleared when a run starts)."""
    from lorakit.batch import RECORD_DIR

    return (Path(jobs[0].output).parent / RECORD_DIR / "staging"
            / f"stop.{os.getpid()}.{secrets.token_hex(4)}")


def run_ray(jobs: list[Job], options: BatchOptions, take: Callable[[JobResult], None]) -> int:
    """Run ``jobs`` as chunked Ray tasks; ``take`` gets each job's result. Returns the CPUs of
    the cluster. See the module docstring for connecting, shipping, chunks and failures.

    Example:
        >>> run_ray(jobs, BatchOptions(executor=Executor.RAY, chunk=8), print)  # doctest: +SKIP
        2
    """
    ray = _import_ray()
    started = connect(ray, options)
    stop = _stop_path(jobs) if jobs else Path(os.devnull)
    # Ray's driver prints cluster events (a task retried, a node dead) on stdout: send them to
    # stderr while the session is ours, so that stdout stays the command's own (--json)
    with contextlib.redirect_stdout(sys.stderr) if started else contextlib.nullcontext():
        try:
            cpus = int(ray.cluster_resources().get("CPU", 0))
            if options.address and options.jobs:
                cpus = min(cpus, options.jobs)
            size = options.chunk or default_chunk(len(jobs), cpus)
            retries = int(_setting("RETRIES", RETRIES))
            task = ray.remote(num_cpus=1, max_retries=retries, retry_exceptions=False)(run_chunk)
            limit = options.jobs if options.address else None  # share a cluster: --jobs N

            def submit(chunk: list[int]):
                return task.remote([(i, jobs[i]) for i in chunk], options.force,
                                   options.keep_going, str(stop))

            _Drain(ray, jobs, options, take, stop).run(_chunks(len(jobs), size), submit, limit)
        finally:
            if jobs:
                with contextlib.suppress(OSError):
                    stop.unlink()
            if started:
                ray.shutdown()
    return max(cpus, 1)


__all__ = ["run_ray", "run_chunk", "default_chunk", "shipped_runtime_env", "connect",
           "MAX_CHUNK", "RETRIES", "FLUSH_S"]
