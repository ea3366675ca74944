"""Ray executor on a real local Ray runtime (one module: the runtime is slow to start)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.cli import main
from tests.conftest import real_adapter

from ._gen import leftovers, make_collection, visible_files, write_corrupt

ray = pytest.importorskip("ray", reason="the `ray` extra is not installed")

REAL = ["bert_hareshj", "distilbert_emotion_dayanidhi", "distilbert_imdb_tashu",
        "flan_t5_base_medqna", "gpt2_anirudh", "gpt2_phuongsky", "gpt2_r4_jhess",
        "roberta_adalora_hadlay", "smollm135m_medai_5ep", "vit_food_lockheed"]
KOHYA = ("sd15_kohyalike_timohavdk", "new.safetensors")


@pytest.fixture(scope="module")
def ray_runtime():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_and_local_pool_give_identical_bytes(ray_runtime, tmp_path, capsys):
    sources = [str(real_adapter(n)) for n in REAL]
    sources += [str(p) for p in make_collection(tmp_path / "gen", 10)]
    assert len(sources) == 20
    sources.append(str(real_adapter(KOHYA[0]) / KOHYA[1]))  # kohya: several metadata keys
    manifest = tmp_path / "sources.txt"
    manifest.write_text("\n".join(sources) + "\n")
    pool, on_ray = tmp_path / "pool", tmp_path / "ray"
    main(["resize", str(manifest), "-o", str(pool), "--rank", "2", "--jobs", "2", "--quiet"])
    main(["resize", str(manifest), "-o", str(on_ray), "--rank", "2", "--executor", "ray",
          "--quiet", "--report", str(tmp_path / "r.json")])
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["executor"] == "ray" and report["counts"]["done"] == 21
    a, b = visible_files(pool), visible_files(on_ray)
    assert len({k.split("/")[0] for k in a}) == 21
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []  # 21 outputs (the kohya file too), same bytes
    capsys.readouterr()


def test_ray_keep_going_and_resume(ray_runtime, tmp_path, capsys):
    ins, out = tmp_path / "in", tmp_path / "out"
    make_collection(ins, 3)
    write_corrupt(ins / "broken.safetensors")
    with pytest.raises(SystemExit) as info:
        main(["resize", str(ins), "-o", str(out), "--rank", "2", "--executor", "ray",
              "--keep-going", "--json"])
    assert info.value.code == 1
    result = json.loads(capsys.readouterr().out)
    assert result["counts"] == {"done": 3, "skipped": 0, "failed": 1, "not run": 0}
    (failed,) = [j for j in result["jobs"] if j["status"] == "failed"]
    assert "broken.safetensors" in failed["error"] and failed["error_type"] == "CorruptFileError"
    (ins / "broken.safetensors").unlink()
    main(["resize", str(ins), "-o", str(out), "--rank", "2", "--executor", "ray", "--json"])
    again = json.loads(capsys.readouterr().out)
    assert again["counts"] == {"done": 0, "skipped": 3, "failed": 0, "not run": 0}
    assert leftovers(out) == []


def test_ray_chunks_stop_at_the_first_failure(ray_runtime, tmp_path, capsys):
    """Chunks of 3: the broken input fails its chunk; queued chunks never start, the one
    running on the other CPU finishes its current job and stops; every output in place was
    reported done, and the rerun (fixed input) completes the rest."""
    ins, out = tmp_path / "in", tmp_path / "out"
    make_collection(ins, 11, dim=256, layers=8)
    write_corrupt(ins / "a_broken.safetensors")  # sorts first: job 0
    with pytest.raises(SystemExit):
        main(["resize", str(ins), "-o", str(out), "--rank", "2", "--executor", "ray",
              "--chunk", "3", "--json"])
    result = json.loads(capsys.readouterr().out)
    counts = result["counts"]
    assert result["jobs"][0]["status"] == "failed" and counts["failed"] == 1
    assert counts["not run"] >= 3  # at least the queued chunks
    done = {Path(j["output"]).name for j in result["jobs"] if j["status"] == "done"}
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == done
    (ins / "a_broken.safetensors").unlink()
    main(["resize", str(ins), "-o", str(out), "--rank", "2", "--executor", "ray", "--chunk",
          "3", "--json"])
    again = json.loads(capsys.readouterr().out)["counts"]
    assert again == {"done": 11 - len(done), "skipped": len(done), "failed": 0, "not run": 0}
    assert leftovers(out) == []
