"""How the Ray executor collects streamed chunk results (lorakit.cluster), against a scripted
stand-in for Ray: duplicates from a retried chunk, a chunk whose task died, the stop file, a
cluster left without CPUs. No Ray runtime (the real ones: test_ray.py, test_ray_cluster.py)."""

from __future__ import annotations

import pytest

from lorakit import cluster
from lorakit.batch import BatchOptions, Executor, Job, JobResult, Status
from lorakit.cluster import _Drain, default_chunk, run_chunk


class RayError(Exception):
    pass


class TaskCancelledError(RayError):
    pass


class FakeRay:
    """``wait`` hands out every generator as ready (or none, when ``cpus`` is 0 and nothing is
    scripted); ``get`` returns a result or raises the scripted error."""

    class exceptions:  # noqa: N801 - mirrors ray.exceptions
        RayError = RayError
        TaskCancelledError = TaskCancelledError

    def __init__(self, cpus: int = 2) -> None:
        self.cpus = cpus
        self.cancelled: list[object] = []

    def wait(self, pending, num_returns=1, timeout=None):
        if self.cpus == 0:
            return [], list(pending)
        return pending[:1], pending[1:]

    def get(self, ref):
        if isinstance(ref, Exception):
            raise ref
        return ref

    def cancel(self, gen):
        self.cancelled.append(gen)

    def cluster_resources(self):
        return {"CPU": float(self.cpus)}


def jobs(n: int) -> list[Job]:
    return [Job("resize", f"/in/a{i}", f"a{i}", f"/out/a{i}", {}, {}) for i in range(n)]


def res(i: int, status: Status = Status.DONE) -> JobResult:
    return JobResult(i, f"a{i}", f"/out/a{i}", status, error="bad" if status is
                     Status.FAILED else None)


def drain(script: dict[tuple[int, ...], list], n: int, tmp_path, keep_going=False, cpus=2,
          limit=None):
    taken: list[JobResult] = []
    ray = FakeRay(cpus)
    ray.submitted = []
    stop = tmp_path / "staging" / "stop.1"
    d = _Drain(ray, jobs(n), BatchOptions(executor=Executor.RAY, keep_going=keep_going),
               taken.append, stop)

    def submit(chunk):
        ray.submitted.append(tuple(chunk))
        return iter(script[tuple(chunk)])

    d.run([list(c) for c in script], submit, limit)
    return taken, ray, stop


def test_a_retried_chunk_reports_each_job_once(tmp_path):
    # the first attempt delivered job 0 then died; the retry skips 0 (its record) and does 1
    taken, _, stop = drain({(0, 1): [res(0), res(0, Status.SKIPPED), res(1)],
                            (2,): [res(2)]}, 3, tmp_path)
    assert [(r.index, r.status) for r in taken] == [(0, Status.DONE), (2, Status.DONE),
                                                   (1, Status.DONE)]
    assert not stop.exists()


def test_a_dead_chunk_fails_its_unfinished_jobs(tmp_path):
    died = RayError("Task failed because the node it was running on is dead.\nmore")
    taken, _, _ = drain({(0, 1, 2): [res(0), died], (3,): [res(3)]}, 4, tmp_path,
                        keep_going=True)
    by_index = {r.index: r for r in taken}
    assert sorted(by_index) == [0, 1, 2, 3]
    assert by_index[0].status is by_index[3].status is Status.DONE
    for i in (1, 2):
        assert by_index[i].status is Status.FAILED and by_index[i].error_type == "RayError"
        assert by_index[i].error == ("Ray task failed: Task failed because the node it was "
                                     "running on is dead.")


def test_without_keep_going_the_first_failure_writes_the_stop_file(tmp_path):
    died = RayError("worker died")
    taken, ray, stop = drain({(0, 1, 2): [res(0), died], (3, 4): [res(3)]}, 5, tmp_path)
    # job 1 was running when the task died: failed; job 2 never ran: left "not run"
    assert [(r.index, r.status) for r in taken] == [(0, Status.DONE), (3, Status.DONE),
                                                   (1, Status.FAILED)]
    assert stop.is_file() and ray.cancelled == []  # running chunks finish their current job


def test_at_most_limit_tasks_at_once_and_none_after_a_stop(tmp_path):
    script = {(0,): [res(0, Status.FAILED)], (1,): [res(1)], (2,): [res(2)], (3,): [res(3)]}
    taken, ray, stop = drain(script, 4, tmp_path, limit=2)
    # chunks 0 and 1 were submitted; 0 failed, so 2 and 3 never were
    assert ray.submitted == [(0,), (1,)] and stop.is_file()
    assert [(r.index, r.status) for r in taken] == [(0, Status.FAILED), (1, Status.DONE)]
    taken, ray, _ = drain({c: [res(c[0])] for c in [(0,), (1,), (2,)]}, 3, tmp_path, limit=1)
    assert ray.submitted == [(0,), (1,), (2,)] and len(taken) == 3


def test_a_cluster_without_cpus_fails_the_queued_jobs(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_RAY_NO_CPU_TIMEOUT", "0")
    monkeypatch.setattr(cluster, "POLL_S", 0.01)
    taken, ray, _ = drain({(0, 1): [res(0)], (2,): [res(2)], (3,): [res(3)]}, 4, tmp_path,
                          keep_going=True, cpus=0, limit=2)
    assert [r.index for r in taken] == [0, 1, 2, 3] and len(ray.cancelled) == 2
    assert all(r.status is Status.FAILED and r.error_type == "ClusterError" for r in taken)
    assert "no CPUs left in the Ray cluster" in taken[0].error


def test_bad_settings_are_named(monkeypatch, tmp_path):
    from lorakit.errors import OptionError

    monkeypatch.setenv("LORAKIT_RAY_NO_CPU_TIMEOUT", "soon")
    with pytest.raises(OptionError, match="LORAKIT_RAY_NO_CPU_TIMEOUT must be a number"):
        drain({}, 0, tmp_path)


def test_run_chunk_honours_the_stop_file(tmp_path, monkeypatch):
    calls = []

    def fake_run_job(job, force, index):
        calls.append(index)
        (tmp_path / "stop").touch()  # the driver stops the run during job 0
        return res(index)

    monkeypatch.setattr("lorakit.batch.run_job", fake_run_job)
    out = list(run_chunk(list(enumerate(jobs(3))), False, False, str(tmp_path / "stop")))
    assert calls == [0] and [[r.index for r in group] for group in out] == [[0]]


def test_run_chunk_groups_results_and_reports_a_failure_at_once(tmp_path, monkeypatch):
    def fake_run_job(job, force, index):
        return res(index, Status.FAILED if index == 2 else Status.DONE)

    monkeypatch.setattr("lorakit.batch.run_job", fake_run_job)
    groups = list(run_chunk(list(enumerate(jobs(5))), False, True))
    # FLUSH_S is not reached by these instant jobs: the failure ends the first group
    assert [[r.index for r in g] for g in groups] == [[0, 1, 2], [3, 4]]
    groups = list(run_chunk(list(enumerate(jobs(5))), False, False))
    assert [[r.index for r in g] for g in groups] == [[0, 1, 2]]  # stopped at the failure
    monkeypatch.setattr(cluster, "FLUSH_S", 0.0)
    groups = list(run_chunk(list(enumerate(jobs(2))), False, False))
    assert [[r.index for r in g] for g in groups] == [[0], [1]]


def test_grouped_results_are_taken_one_by_one(tmp_path):
    taken, _, _ = drain({(0, 1, 2): [[res(0), res(1)], [res(2)]]}, 3, tmp_path)
    assert [r.index for r in taken] == [0, 1, 2]


def test_default_chunk():
    assert default_chunk(500, 2) == 63  # 8 tasks of 63: 0.44 ms of Ray overhead per job
    assert default_chunk(100_000, 16) == cluster.MAX_CHUNK
    assert default_chunk(3, 8) == 1 and default_chunk(0, 0) == 1


def test_chunk_needs_ray_and_a_positive_size():
    from lorakit.errors import OptionError

    with pytest.raises(OptionError, match="--chunk needs --executor ray"):
        BatchOptions(chunk=4)
    with pytest.raises(OptionError, match="at least 1, got 0"):
        BatchOptions(executor=Executor.RAY, chunk=0)
    assert BatchOptions(executor=Executor.RAY, chunk=8).chunk == 8


def test_a_chunk_that_raised_on_the_worker_names_the_cause(tmp_path):
    class RayTaskError(RayError):
        def __init__(self, cause):
            super().__init__("ray::run_chunk() (pid=12, ip=10.0.0.2)\n  traceback ...")
            self.cause = cause

    err = RayTaskError(ModuleNotFoundError("No module named 'safetensors'"))
    taken, _, _ = drain({(0, 1): [err]}, 2, tmp_path, keep_going=True)
    assert [r.error for r in taken] == [
        "Ray task failed: ModuleNotFoundError: No module named 'safetensors'"] * 2


def test_a_dead_chunk_reports_its_recorded_jobs_done(tmp_path, monkeypatch):
    # jobs 0 and 1 finished (output and record in place) but their group was never sent
    monkeypatch.setattr("lorakit.batch.finished", lambda job: job.label in ("a0", "a1"))
    died = RayError("Task failed because the node it was running on is dead.")
    taken, _, _ = drain({(0, 1, 2): [died]}, 3, tmp_path, keep_going=True)
    assert [(r.index, r.status) for r in taken] == [(0, Status.DONE), (1, Status.DONE),
                                                   (2, Status.FAILED)]
