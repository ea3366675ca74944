"""Batch runs over collections with the local executors: sources, resume, failures, reports."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.batch import BatchOptions, Status, job_command, plan_jobs, run_batch
from lorakit.cli import main
from lorakit.errors import InputNotFoundError, OptionError
from lorakit.sources import expand

from ._gen import leftovers, make_collection, visible_files, write_corrupt


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_expand_paths_globs_collections_manifests(tmp_path):
    ins = tmp_path / "in"
    make_collection(ins, 3)
    (ins / "notes.txt").write_text("not an adapter\n")
    plan = expand([str(ins)])
    assert plan.is_collection and [s.name for s in plan.sources] == ["gen_000", "gen_001",
                                                                     "gen_002"]
    assert [s.name for s in expand([str(ins / "gen_00[12]")]).sources] == ["gen_001", "gen_002"]
    single = expand([str(ins / "gen_000")])
    assert not single.is_collection and len(single.sources) == 1
    manifest = tmp_path / "list.txt"
    manifest.write_text("# sources\nin/gen_002\n\nin/gen_000  # first\nhf://org/lora@v2/unet\n")
    plan = expand([f"@{manifest}"])
    assert [s.spec for s in plan.sources] == [str(tmp_path / "in/gen_002"),
                                              str(tmp_path / "in/gen_000"),
                                              "hf://org/lora@v2/unet"]
    assert plan.sources[2].name == "lora--unet"
    assert expand([str(manifest)]).is_collection  # the .txt suffix marks a manifest too
    bad = tmp_path / "bad.txt"
    bad.write_text("in/gen_000\nin/absent\n")
    with pytest.raises(InputNotFoundError) as info:
        expand([str(tmp_path / "nowhere"), str(tmp_path / "x*.safetensors"), str(bad)])
    msg = str(info.value)
    assert "3 source(s) are not usable" in msg
    assert "nowhere: no such file" in msg and "matches nothing" in msg and "bad.txt:2:" in msg


def test_plan_refuses_collisions_and_overwriting_inputs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_collection(a, 1)
    make_collection(b, 1)
    with pytest.raises(OptionError, match="would all be written to"):
        plan_jobs("resize", expand([str(a / "gen_000"), str(b / "gen_000")]), tmp_path / "o",
                  {"policy": {"rank": 2}})
    with pytest.raises(OptionError, match="would replace it"):
        plan_jobs("resize", expand([str(a)]), a, {"policy": {"rank": 2}})
    assert job_command("resize", "x", {"policy": {"rank": 2, "energy": None}, "to": None,
                                       "device": "auto"}) == "lorakit resize x --rank 2"


def test_collection_outputs_match_single_runs(tmp_path, capsys):
    """Each batch output is exactly what the single-adapter command writes (weights, config)."""
    ins = tmp_path / "in"
    make_collection(ins, 3)
    code, _, err = run_cli(capsys, "resize", str(ins), "-o", str(tmp_path / "out"), "--rank",
                           "2", "--quiet")
    assert code == 0, err
    for i in range(3):
        single = tmp_path / f"single_{i}"
        run_cli(capsys, "resize", str(ins / f"gen_{i:03d}"), "-o", str(single), "--rank", "2",
                "--quiet")
        batch = tmp_path / "out" / f"gen_{i:03d}"
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            assert (batch / name).read_bytes() == (single / name).read_bytes()
        card = (batch / "README.md").read_text()
        assert f"command: `lorakit resize {ins / f'gen_{i:03d}'} --rank 2`" in card


def test_convert_and_squeeze_collections(tmp_path, capsys):
    ins = tmp_path / "in"
    make_collection(ins, 2)
    code, _, err = run_cli(capsys, "convert", str(ins / "gen_*"), "--to", "kohya", "-o",
                           str(tmp_path / "k"), "--quiet")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "k").iterdir() if not p.name.startswith(".")) == \
        ["gen_000.safetensors", "gen_001.safetensors"]
    # kohya files as a collection, back to PEFT folders, then squeezed
    code, _, err = run_cli(capsys, "convert", str(tmp_path / "k"), "--to", "peft", "-o",
                           str(tmp_path / "p"), "--quiet")
    assert code == 0, err
    code, _, err = run_cli(capsys, "squeeze", str(tmp_path / "p"), "-o", str(tmp_path / "s"),
                           "--rank", "1", "--quiet")
    assert code == 0, err
    for i in range(2):
        orig = lorakit.load(ins / f"gen_{i:03d}")
        back = lorakit.load(tmp_path / "p" / f"gen_{i:03d}")
        for k, m in orig.modules.items():
            torch.testing.assert_close(back.modules[k].delta(), m.delta(), rtol=1e-6, atol=1e-6)
        assert set(lorakit.load(tmp_path / "s" / f"gen_{i:03d}").ranks().values()) == {1}


def test_killed_run_resumes_only_missing_outputs(tmp_path, capsys):
    """A real interruption: the CLI is SIGKILLed after a few outputs; the rerun completes only
    the missing ones and leaves the finished ones untouched."""
    ins, out = tmp_path / "in", tmp_path / "out"
    n = 40
    make_collection(ins, n, rank=8, dim=256, layers=6)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lorakit.cli", "resize", str(ins), "-o",
                             str(out), "--rank", "2", "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    records = out / ".lorakit-batch"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if records.is_dir() and len(list(records.glob("*.json"))) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    if proc.returncode == 0:
        pytest.fail("the run finished before it could be killed; make the jobs larger")
    assert proc.returncode == -signal.SIGKILL
    finished = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    recorded = sorted(p.name[:-len(".json")] for p in records.glob("*.json"))
    assert 3 <= len(finished) < n
    # never an output without its record (a record may precede its output's rename by a moment)
    assert set(finished) <= set(recorded) and len(recorded) - len(finished) <= 1
    before = visible_files(out)

    code, _, err = run_cli(capsys, "resize", str(ins), "-o", str(out), "--rank", "2", "--quiet",
                           "--report", str(tmp_path / "r.json"))
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    status = {Path(j["output"]).name: j["status"] for j in report["jobs"]}
    assert sorted(k for k, v in status.items() if v == "skipped") == finished
    assert report["counts"] == {"done": n - len(finished), "skipped": len(finished),
                                "failed": 0, "not run": 0}
    after = visible_files(out)
    assert {k: v for k, v in after.items() if k in before} == before  # untouched
    assert len({k.split("/")[0] for k in after}) == n
    assert leftovers(out) == []


def test_changed_options_are_refused_then_forced(tmp_path, capsys):
    ins, out = tmp_path / "in", tmp_path / "out"
    make_collection(ins, 2)
    assert run_cli(capsys, "resize", str(ins), "-o", str(out), "--rank", "2", "--quiet")[0] == 0
    code, _, err = run_cli(capsys, "resize", str(ins), "-o", str(out), "--rank", "3", "--quiet")
    assert code == 1 and "no batch record matches" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "resize", str(ins), "-o", str(out), "--rank", "3", "--quiet",
                           "--force")
    assert code == 0, err
    assert set(lorakit.load(out / "gen_001").ranks().values()) == {3}
    # an edited output no longer matches its record: refused without --force
    (out / "gen_000" / "adapter_config.json").write_text("{}")
    code, _, err = run_cli(capsys, "resize", str(ins), "-o", str(out), "--rank", "3", "--quiet")
    assert code == 1 and "gen_000" in err


def test_keep_going_reports_a_corrupt_input(tmp_path, capsys):
    ins, out = tmp_path / "in", tmp_path / "out"
    make_collection(ins, 4)
    bad = write_corrupt(ins / "broken.safetensors")
    code, stdout, err = run_cli(capsys, "resize", str(ins), "-o", str(out), "--rank", "2",
                                "--keep-going", "--report", str(tmp_path / "r.csv"))
    assert code == 1
    assert err.startswith("lorakit: error:") and "1 of 5 jobs failed" in err
    assert "broken" in stdout and "failed" in stdout  # the summary table
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert len(rows) == 5
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 1 and str(bad) in failed[0]["error"]
    assert "truncated" in failed[0]["error"] and failed[0]["error_type"] == "CorruptFileError"
    assert all(r["status"] == "done" and float(r["seconds"]) > 0 for r in rows if r not in failed)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        [f"gen_{i:03d}" for i in range(4)]
    assert leftovers(out) == []


@pytest.mark.parametrize("jobs", [1, 2])
def test_stops_at_first_failure_with_no_partial_files(tmp_path, jobs):
    ins, out = tmp_path / "in", tmp_path / "out"
    good = make_collection(ins, 5)
    bad = write_corrupt(ins / "broken.safetensors")
    specs = [str(good[0]), str(bad), *map(str, good[1:])]
    jobs_list = plan_jobs("resize", expand(specs), out, {"policy": {"rank": 2}})
    result = run_batch(jobs_list, BatchOptions(jobs=jobs))
    statuses = [r.status for r in result.results]
    assert statuses[1] is Status.FAILED and not result.ok
    if jobs == 1:
        assert statuses == [Status.DONE, Status.FAILED] + [Status.NOT_RUN] * 4
    assert all(s in (Status.DONE, Status.FAILED, Status.NOT_RUN) for s in statuses)
    written = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert written == sorted(Path(r.output).name for r in result.results
                             if r.status is Status.DONE)
    assert "broken.safetensors" not in written and leftovers(out) == []
    for name in written:  # whatever was written is complete
        assert set(lorakit.load(out / name).ranks().values()) == {2}


def test_local_pool_matches_inline_bytes(tmp_path):
    ins = tmp_path / "in"
    make_collection(ins, 6)
    plan = expand([str(ins)])
    a = run_batch(plan_jobs("resize", plan, tmp_path / "a", {"policy": {"energy": 0.9}}))
    b = run_batch(plan_jobs("resize", plan, tmp_path / "b", {"policy": {"energy": 0.9}}),
                  BatchOptions(jobs=2))
    assert a.ok and b.ok and b.workers == 2
    assert visible_files(tmp_path / "a") == visible_files(tmp_path / "b")
    assert len(visible_files(tmp_path / "a")) == 18


def test_finished_tells_a_recorded_output_from_a_changed_or_missing_one(tmp_path):
    """What the Ray driver checks for the jobs of a chunk whose worker died before reporting."""
    from lorakit.batch import finished

    make_collection(tmp_path / "in", 2)
    jobs = plan_jobs("resize", expand([str(tmp_path / "in")]), tmp_path / "out",
                     {"policy": {"rank": 2}})
    assert not any(finished(j) for j in jobs)
    assert run_batch(jobs, BatchOptions(jobs=1)).ok
    assert all(finished(j) for j in jobs)
    weights = next(p for p in Path(jobs[0].output).iterdir() if p.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes() + b" ")  # changed after the batch wrote it
    assert not finished(jobs[0]) and finished(jobs[1])
    other = plan_jobs("resize", expand([str(tmp_path / "in")]), tmp_path / "out",
                      {"policy": {"rank": 1}})  # other options: not this job's output
    assert not finished(other[1])
