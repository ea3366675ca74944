"""``--executor ray --address`` against a real cluster on this host, started with ``ray start``.

One module-scoped cluster (:class:`lorakit.localcluster.LocalCluster`): a head node with one CPU
and a worker node with one CPU, each a ``ray start --block`` process session of its own (own temp
dir and ports), both stopped at the end even when a test fails. The nodes run a Python that cannot
import lorakit (a venv that sees the project's site-packages but not its editable install), so a
batch that succeeds shows that the job shipped the package to the workers. The drivers are the
``lorakit`` CLI in subprocesses started in a scratch folder (Ray adds the driver's folder to the
workers' path). Select these with ``-m cluster``; they take about a minute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest
from huggingface_hub import constants

from lorakit.cli import main
from lorakit.formats import save_adapter
from lorakit.localcluster import LocalCluster, free_port
from tests.hub._cache import add_snapshot, folder_bytes

from ._gen import leftovers, make_adapter, make_collection, visible_files

pytest.importorskip("ray", reason="the `ray` extra is not installed")

pytestmark = pytest.mark.cluster

LORAKIT = Path(sys.executable).with_name("lorakit")
RUN_TIMEOUT = 180  # seconds: a batch that hangs fails the test instead of blocking the suite


def _node_python(root: Path) -> str:
    """A venv whose Python imports Ray, torch, ... from this environment's site-packages (one
    path line in a .pth file: .pth files inside it, such as the editable install's, are not
    processed), but not lorakit."""
    venv = root / "nodepy"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   stdout=subprocess.DEVNULL)
    site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    (site / "lorakit_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = str(venv / "bin" / "python")
    probe = subprocess.run([python, "-c", "import ray, torch, safetensors; import lorakit"],
                           cwd=root, capture_output=True, text=True)
    assert "No module named 'lorakit'" in probe.stderr, probe.stderr  # only ray & co. import
    return python


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    hub = root / "hf_cache"  # the workers' Hub cache (the driver's is elsewhere and empty)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub)}
    with LocalCluster(head_cpus=1, python=_node_python(root), env=env) as c:
        c.hub_cache = hub  # type: ignore[attr-defined]
        c.add_node(cpus=1)
        yield c


def lorakit(args: list[str], cwd: Path, env: dict[str, str] | None = None,
            watch=None) -> subprocess.CompletedProcess:
    """Run the CLI (a Ray driver) in ``cwd``; ``watch()`` is polled while it runs until it
    returns True. Output goes to files (a full pipe would block the driver)."""
    full_env = {**os.environ, **(env or {})}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([str(LORAKIT), *args], cwd=cwd, env=full_env, text=True,
                                stdout=out, stderr=err)
        deadline = time.monotonic() + RUN_TIMEOUT
        while watch is not None and proc.poll() is None and time.monotonic() < deadline:
            if watch():
                watch = None
            time.sleep(0.02)
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            err.seek(0)
            pytest.fail(f"lorakit {' '.join(args)} hung (> {RUN_TIMEOUT}s): {err.read()[-2000:]}")
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())


def busy(node) -> bool:
    """Whether a worker of ``node`` is running a chunk (Ray titles it ``ray::run_chunk``)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getsid(int(pid)) != node.process.pid:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::run_chunk"):
                    return True
        except OSError:
            continue
    return False


def records(out: Path) -> int:
    folder = out / ".lorakit-batch"
    return len(list(folder.glob("*.json"))) if folder.is_dir() else 0


def hub_sources(cache: Path, build: Path, n: int) -> list[str]:
    """``n`` PEFT adapters as ``hf://org/loraI`` in an offline Hub cache."""
    specs = []
    for i in range(n):
        save_adapter(make_adapter(100 + i, rank=8, dim=256, layers=8), build / f"r{i}", "peft")
        add_snapshot(cache, f"org/lora{i}", f"{i}" * 40, folder_bytes(build / f"r{i}"),
                     refs=("main",))
        specs.append(f"hf://org/lora{i}")
    return specs


def outputs(out: Path) -> dict[str, int]:
    """Outputs in place (name -> mtime of the output's weights)."""
    return {p.name: max(f.stat().st_mtime_ns for f in p.iterdir()) for p in sorted(out.iterdir())
            if not p.name.startswith(".")}


def test_resize_on_cluster_survives_killed_workers(cluster, tmp_path, monkeypatch):
    """40 local folders and 3 hf:// sources (cached on the nodes only) resized through
    --address; the worker node is killed inside a chunk, with retries off (its jobs fail,
    named, the run stops) and then on a second node during the rerun (Ray retries its chunk on
    the head). The rerun leaves what was finished untouched and ends byte-identical to the
    local pool's outputs."""
    n_local, n_hub = 40, 3
    n = n_local + n_hub
    sources = [str(p) for p in make_collection(tmp_path / "in", n_local, rank=8, dim=256,
                                               layers=8)]
    sources += hub_sources(cluster.hub_cache, tmp_path / "build", n_hub)
    manifest = tmp_path / "sources.txt"
    manifest.write_text("".join(f"{s}\n" for s in sources))
    pool, out = tmp_path / "pool", tmp_path / "cluster"
    with monkeypatch.context() as m:  # the pool reads the Hub cache that the nodes have
        m.setenv("HF_HUB_OFFLINE", "1")
        m.setenv("HF_HUB_CACHE", str(cluster.hub_cache))
        m.setattr(constants, "HF_HUB_CACHE", str(cluster.hub_cache))
        m.setattr(constants, "HF_HUB_OFFLINE", True)
        main(["resize", str(manifest), "-o", str(pool), "--rank", "4", "--jobs", "2",
              "--quiet"])
    empty = tmp_path / "driver_hf_cache"  # the driver has no copy: only the workers resolve
    env = {**cluster.client_env, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(empty)}
    args = ["resize", str(manifest), "-o", str(out), "--rank", "4", "--executor", "ray",
            "--address", cluster.address, "--chunk", "4", "--json"]

    def killer(node, at_least: int, seen: list[int]):
        def watch() -> bool:
            if records(out) >= at_least and busy(node):  # the node is inside a chunk
                seen.append(records(out))
                cluster.kill(node)
                return True
            return False
        return watch

    # 1. retries off: the chunk on the dead node fails, cleanly and named; the run stops
    worker, seen = cluster.nodes[1], []
    first = lorakit(args, tmp_path, {**env, "LORAKIT_RAY_RETRIES": "0"},
                    watch=killer(worker, 2, seen))
    assert seen, f"the batch ended before the worker node could be killed: {first.stderr}"
    assert not worker.alive and first.returncode == 1, first.stderr
    assert first.stderr.strip().splitlines()[-1].startswith("lorakit: error: ")
    result = json.loads(first.stdout)  # Ray's own messages went to stderr
    failed = [j for j in result["jobs"] if j["status"] == "failed"]
    assert failed and all(j["error"].startswith("Ray task failed") for j in failed), failed
    # (a job the dead node finished may have its record but no reported result)
    assert 0 < result["counts"]["done"] < n and records(out) >= seen[0]
    # every output in place is complete and recorded (a job killed between its record and its
    # rename leaves a record without output: redone); nothing partial is visible
    kept = outputs(out)
    assert len(kept) >= result["counts"]["done"]
    assert all((out / ".lorakit-batch" / f"{name}.json").is_file() for name in kept)

    # 2. the rerun on a new node, killed too: Ray retries its chunk on the head node
    node, seen = cluster.add_node(cpus=1), []
    again = lorakit(args, tmp_path, env, watch=killer(node, len(kept) + 2, seen))
    assert seen, f"the rerun ended before the new node could be killed: {again.stderr}"
    assert not node.alive and again.returncode == 0, again.stderr
    counts = json.loads(again.stdout)["counts"]
    assert counts["failed"] == counts["not run"] == 0
    assert counts["skipped"] >= len(kept) and counts["done"] + counts["skipped"] == n
    after = outputs(out)
    assert {k: after[k] for k in kept} == kept  # finished outputs were not redone
    a, b = visible_files(pool), visible_files(out)
    assert len({k.split("/")[0] for k in a}) == n and a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []  # byte-identical to the local pool's outputs
    assert leftovers(out) == []
    assert not empty.exists() or not any(empty.iterdir())


def test_unreachable_address_is_one_line_at_once(tmp_path, capsys):
    make_collection(tmp_path / "in", 2)
    t = time.monotonic()
    with pytest.raises(SystemExit) as info:
        main(["resize", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--rank", "2",
              "--executor", "ray", "--address", f"127.0.0.1:{free_port()}"])
    assert info.value.code == 1 and time.monotonic() - t < 30
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no Ray cluster answers at 127.0.0.1:" in err
    assert not (tmp_path / "out").exists()
