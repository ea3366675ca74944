"""Benchmark: batch-resize 500 GPT-2-shaped adapters (rank 8, q/v, 12 layers) to rank 4.

Each generated adapter is a PEFT folder: ``q_proj`` and ``v_proj`` (768 x 768) in 12 layers,
rank 8, alpha 16, float32 (24 modules, 295k parameters, 1.2 MB). All are resized to rank 4 by:

  * bare: a plain in-process loop of ``load_adapter`` / ``resize`` / ``save_adapter`` (no batch
    machinery), the baseline per-adapter time;
  * inline: ``run_batch`` with one job at a time in this process (hashes, records, staging);
  * pool x1 and pool x2: the local process pool (forked workers, one torch thread each);
  * ray c1: a local Ray runtime with 2 CPUs, one job per Ray task (``--chunk 1``);
  * ray: the same runtime with the default chunk (:func:`lorakit.cluster.default_chunk`);
  * cluster 1st: a real two-node cluster on this host (``ray start --head`` with 1 CPU and a
    second ``ray start --address`` node with 1 CPU: the pool's 2 CPUs), reached through
    ``--address`` with lorakit shipped to the workers, default chunk; a new driver's first batch,
    whose workers start inside the timed run;
  * cluster: the same cluster's next batch, on warm workers (the target row).

Ray start-up is timed apart: ``ray.init`` / the nodes' start, then a cold batch of 20 adapters
and one task per CPU of every node that start the job's workers (the runtime environment, torch
imported); the timed batch then runs on warm workers, as every batch but the first one of a long-lived driver would, and as the pool's
forked workers start warm.

Printed per mode: wall time, adapters/s (whole run, and steady state from the first to the last
result, which leaves out worker start-up), the per-job cost (workers x wall / N) and its overhead
over the bare time, the mean wall and CPU time inside a job, and the CPU time of every process of
the run per adapter ("all cpu": driver, pool workers, Ray's GCS, raylets, agents and workers); CPU
time does not depend on what else runs on the machine. Then the scaling ratios (target: pool x2
>= 1.6x one worker), the Ray rows against pool x2 (target: the chunked cluster run >= 0.8x), by
wall time and by all-process CPU per adapter (what idle cores would give), and the cost of a
resume check (a rerun that skips all N). The machine is shared: the load average is printed, and
a control runs the bare loop in two processes at once against one (no lorakit batch code), to
show what two workers can gain on the machine at that moment.

Usage: python bench/batch.py [--n 500] [--no-ray] [--no-cluster] [--workdir DIR]
       (under ``flock /tmp/lorakit-bench.lock`` on a shared machine)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lorakit.batch import BatchOptions, Executor, _run_pool, plan_jobs, run_batch  # noqa: E402
from lorakit.compress.resize import resize  # noqa: E402
from lorakit.formats import load_adapter, save_adapter  # noqa: E402
from lorakit.lowrank import RankPolicy  # noqa: E402
from lorakit.sources import expand  # noqa: E402

DIM, LAYERS, RANK, NEW_RANK = 768, 12, 8, 4


def generate(root: Path, n: int) -> None:
    """``n`` PEFT folders with seeded random factors (B scaled so updates are not tiny)."""
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "base_model_name_or_path":
              "gpt2-shaped", "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for layer in range(LAYERS):
            for proj in ("q_proj", "v_proj"):
                key = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, DIM, generator=g) * 0.02
                tensors[f"{key}.lora_B.weight"] = torch.randn(DIM, RANK, generator=g) * 0.02
        folder = root / f"a{i:04d}"
        folder.mkdir(parents=True)
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        (folder / "adapter_config.json").write_text(json.dumps(config))


def bare(sources: list[Path], out: Path) -> tuple[float, float]:
    """Wall and CPU seconds for the plain loop over every source."""
    policy = RankPolicy.from_options(rank=NEW_RANK)
    t0, c0 = time.perf_counter(), time.process_time()
    for src in sources:
        small, _ = resize(load_adapter(src), policy)
        save_adapter(small, out / src.name, "peft")
    return time.perf_counter() - t0, time.process_time() - c0


def _bare_child(args: tuple[list[Path], Path]) -> float:
    torch.set_num_threads(1)
    return bare(*args)[0]


def control(sources: list[Path], work: Path) -> float:
    """What two cores give right now: the bare loop over ``sources`` in one process, then split
    over two processes at once (no lorakit batch code); returns the throughput ratio."""
    import multiprocessing

    torch.set_num_threads(1)
    one = bare(sources, work / "control1")[0]
    half = len(sources) // 2
    parts = [(sources[:half], work / "control2a"), (sources[half:], work / "control2b")]
    t = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.map(_bare_child, parts)
    two = time.perf_counter() - t
    torch.set_num_threads(os.cpu_count() or 1)
    return one / two


def tree_cpu() -> float:
    """CPU seconds used so far by this process and every descendant (pool workers, a local Ray
    runtime, the cluster's nodes and their workers), dead children that were waited for
    included. Unlike wall time it does not depend on what else runs on the machine."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after the name: state ppid pgrp session ... utime(12) stime cutime cstime
        stats[int(pid)] = (int(fields[1]), sum(int(x) for x in fields[11:15]) / tick)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [os.getpid()]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0.0))[1]
        todo.extend(children.get(pid, []))
    return total


def timed(label: str, fn, n: int, workers: int, bare_per_job: float) -> dict:
    stamps: list[float] = []
    cpu0 = tree_cpu()
    t0 = time.perf_counter()
    result = fn(lambda r: stamps.append(time.perf_counter()))
    wall = time.perf_counter() - t0
    all_cpu = (tree_cpu() - cpu0) / n
    assert result.ok, [r.error for r in result.failed][:3]
    steady = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    per_job = workers * wall / n
    in_task = sum(r.seconds for r in result.results) / n
    cpu = sum(r.cpu_seconds for r in result.results) / n
    row = {"mode": label, "workers": workers, "wall_s": wall, "rate": n / wall,
           "steady_rate": steady, "first_result_s": stamps[0] - t0, "per_job_ms": 1e3 * per_job,
           "overhead_ms": 1e3 * (per_job - bare_per_job), "in_task_ms": 1e3 * in_task,
           "cpu_ms": 1e3 * cpu, "all_cpu_ms": 1e3 * all_cpu}
    print(f"{label:<10} {workers:>2} {wall:8.2f} {row['rate']:9.1f} {steady:9.1f} "
          f"{row['first_result_s']:8.2f} {row['per_job_ms']:9.2f} {row['overhead_ms']:9.2f} "
          f"{row['in_task_ms']:9.2f} {row['cpu_ms']:9.2f} {row['all_cpu_ms']:9.2f}", flush=True)
    return row


def warm_every_node(ray) -> None:
    """Start, on every alive node, as many workers as it has CPUs, each with lorakit's batch code
    imported (what a chunk task imports). The cold batch alone does not: its few short chunks
    may all run on the head node's worker before the other node's worker is up, and that worker
    would then start inside the timed batch (measured: 6.4 s for the first 500 against 3.9-4.3 s
    for the next ones)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=1)
    def ready(seconds: float) -> int:
        import lorakit.batch  # noqa: F401  (torch and the batch code, as a chunk task needs)

        time.sleep(seconds)  # hold the CPU so that the node's other CPUs get their own workers
        return os.getpid()

    refs = [ready.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
                node["NodeID"], soft=False)).remote(0.5)
            for node in ray.nodes() if node["Alive"]
            for _ in range(int(node["Resources"].get("CPU", 0)))]
    ray.get(refs)


def ray_rows(work: Path, plan, opts: dict, n: int, bare_job: float, cluster: bool) -> list:
    """Rows for a local Ray runtime (chunk 1, default chunk) and a two-node cluster."""
    from lorakit.localcluster import LocalCluster

    nodes = LocalCluster(head_cpus=1)
    # one token for every Ray session of this process, set before Ray reads its configuration
    os.environ.update(nodes.client_env)
    import ray

    from lorakit.cluster import default_chunk, shipped_runtime_env
    warm_plan = expand([str(p) for p in sorted((work / "in").iterdir())[:20]])

    def batch(name: str, chunk: int | None, warm_up: bool = True):
        def go(cb):
            return run_batch(plan_jobs("resize", plan, work / name, opts),
                             BatchOptions(executor=Executor.RAY, chunk=chunk), on_result=cb)
        if warm_up:  # starts the job's workers; not timed with the batch
            t = time.perf_counter()
            run_batch(plan_jobs("resize", warm_plan, work / f"{name}_warm", opts),
                      BatchOptions(executor=Executor.RAY, chunk=chunk))
            warm_every_node(ray)
            print(f"  (cold batch of 20 on {name}, then every node warm: "
                  f"{time.perf_counter() - t:.2f}s)", flush=True)
        return go

    rows = []
    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"  (ray.init, local runtime with 2 CPUs: {time.perf_counter() - t:.2f}s)", flush=True)
    rows.append(timed("ray c1", batch("ray_c1", 1), n, 2, bare_job))
    print(f"  (default chunk for {n} jobs on 2 CPUs: {default_chunk(n, 2)})")
    rows.append(timed("ray", batch("ray", None), n, 2, bare_job))
    ray.shutdown()
    if not cluster:
        return rows
    t = time.perf_counter()
    with nodes:
        nodes.add_node(cpus=1)
        started = time.perf_counter() - t
        t = time.perf_counter()
        ray.init(address=nodes.address, runtime_env=shipped_runtime_env(),
                 include_dashboard=False, log_to_driver=False)
        print(f"  (cluster: head + node started in {started:.2f}s, ray.init with lorakit "
              f"shipped {time.perf_counter() - t:.2f}s; CPUs {ray.cluster_resources()['CPU']:.0f})",
              flush=True)
        try:
            # a new driver's first batch: each node starts its worker (runtime environment, torch
            # imported) inside the timed run; reported, the target is on the warm row below
            rows.append(timed("cluster 1st", batch("cluster_cold", None, warm_up=False), n, 2,
                              bare_job))
            rows.append(timed("cluster", batch("cluster", None), n, 2, bare_job))
        finally:
            ray.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--no-cluster", action="store_true", help="skip the two-node cluster row")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lorakit_bench_batch_"))
    n = args.n
    print(f"load average before: {os.getloadavg()}; cores: {os.cpu_count()}; "
          f"torch threads: {torch.get_num_threads()}")
    t = time.perf_counter()
    generate(work / "in", n)
    print(f"generated {n} adapters ({LAYERS} layers x q/v {DIM}x{DIM}, rank {RANK}) in "
          f"{time.perf_counter() - t:.1f}s under {work}")
    sources = sorted((work / "in").iterdir())
    plan = expand([str(work / "in")])
    opts = {"policy": {"rank": NEW_RANK}}

    def jobs_into(name: str):
        return plan_jobs("resize", plan, work / name, opts)

    bare(sources[:20], work / "warmup")  # imports, allocator and page cache warm
    bare_s, bare_cpu = bare(sources, work / "bare")
    bare_job = bare_s / n
    print(f"bare loop: {bare_s:.2f}s, {1e3 * bare_job:.2f} ms per adapter "
          f"(CPU {1e3 * bare_cpu / n:.2f} ms), {n / bare_s:.1f} adapters/s\n")
    print(f"{'mode':<10} {'w':>2} {'wall s':>8} {'adapt/s':>9} {'steady/s':>9} {'first s':>8} "
          f"{'job ms':>9} {'ovh ms':>9} {'task ms':>9} {'cpu ms':>9} {'all cpu':>9}")
    rows = [timed("inline", lambda cb: run_batch(jobs_into("inline"), BatchOptions(jobs=1),
                                                 on_result=cb), n, 1, bare_job)]

    def pool(name: str, workers: int):
        def go(cb):
            from lorakit.batch import BatchResult, JobResult, Status

            jobs = jobs_into(name)
            results = [JobResult(i, j.label, j.output, Status.NOT_RUN) for i, j in enumerate(jobs)]

            def take(r):
                results[r.index] = r
                cb(r)

            t0 = time.perf_counter()
            # a pool even for one worker, one torch thread per worker in both pool rows
            _run_pool(jobs, BatchOptions(jobs=workers, threads=1), take)
            return BatchResult(results, time.perf_counter() - t0, "local", workers)
        return go

    rows.append(timed("pool", pool("pool1", 1), n, 1, bare_job))
    rows.append(timed("pool", pool("pool2", 2), n, 2, bare_job))
    ray_runs = []
    if not args.no_ray:
        ray_runs = ray_rows(work, plan, opts, n, bare_job, cluster=not args.no_cluster)
        # the pool again, right after the Ray rows: the load of a shared machine drifts, so the
        # Ray rows are compared with the mean of the pool runs before and after them
        after = timed("pool", pool("pool2b", 2), n, 2, bare_job)
    t = time.perf_counter()
    again = run_batch(jobs_into("inline"), BatchOptions(jobs=1))
    resume = time.perf_counter() - t
    assert again.counts()["skipped"] == n
    print(f"\nresume check (all {n} skipped, inline): {resume:.2f}s, "
          f"{1e3 * resume / n:.2f} ms per job")
    ceiling = control(sources[:200], work)
    print(f"control: the bare loop (no batch code) in 2 processes at once vs 1: {ceiling:.2f}x "
          "(what the machine gives two workers right now)")
    inline, pool1, pool2 = rows[0], rows[1], rows[2]
    print(f"scaling pool x2 / inline:  {pool2['rate'] / inline['rate']:.2f}x "
          f"(steady state {pool2['steady_rate'] / inline['steady_rate']:.2f}x)")
    print(f"scaling pool x2 / pool x1: {pool2['rate'] / pool1['rate']:.2f}x "
          f"(steady state {pool2['steady_rate'] / pool1['steady_rate']:.2f}x)   target >= 1.6x")
    if ray_runs:
        rate = (pool2["rate"] + after["rate"]) / 2
        steady = (pool2["steady_rate"] + after["steady_rate"]) / 2
        print(f"pool x2 before / after the Ray rows: {pool2['rate']:.1f} / {after['rate']:.1f} "
              f"adapters/s (mean {rate:.1f})")
        pool_cpu = (pool2["all_cpu_ms"] + after["all_cpu_ms"]) / 2
    for r in ray_runs:
        print(f"{r['mode']:<10} / pool x2: {r['rate'] / rate:.2f}x (steady state "
              f"{r['steady_rate'] / steady:.2f}x); per-job overhead {r['overhead_ms']:.2f} ms "
              f"over the bare {1e3 * bare_job:.2f} ms (in-task {r['in_task_ms']:.2f} ms)"
              + ("   target >= 0.8x" if r["mode"] == "cluster" else "")
              + ("   (workers started inside the run)" if r["mode"] == "cluster 1st" else ""))
        print(f"{'':<10}   CPU of every process per adapter: {r['all_cpu_ms']:.2f} ms against "
              f"the pool's {pool_cpu:.2f} ms: on idle cores {pool_cpu / r['all_cpu_ms']:.2f}x "
              "the pool's throughput (if both kept the cores busy)")
    cpu_scaling = min(2, os.cpu_count() or 1) * inline["cpu_ms"] / pool2["cpu_ms"]
    print(f"CPU per job: inline {inline['cpu_ms']:.2f} ms, pool x2 {pool2['cpu_ms']:.2f} ms: on "
          f"two idle cores pool x2 would give at most {cpu_scaling:.2f}x inline (steady state)")
    print(f"load average after: {os.getloadavg()}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
