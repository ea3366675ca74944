"""extract: recovers a known low-rank update near-optimally, bounded memory on sharded files."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import lorakit
import lorakit.compress.extract
import lorakit.lowrank
from lorakit.cli import cli


def _write_sharded(folder, tensors, n_shards=2):
    folder.mkdir(parents=True)
    keys = list(tensors)
    weight_map = {}
    for s in range(n_shards):
        part = {k: tensors[k] for k in keys[s::n_shards]}
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _models(tmp_path, noise=1e-3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base, tuned, truth = {}, {}, {}
    for i in range(3):
        for name, (o, n) in {"q_proj": (48, 32), "up_proj": (64, 32)}.items():
            key = f"model.layers.{i}.{name}.weight"
            w = torch.randn(o, n, generator=g)
            low = torch.randn(o, 4, generator=g) @ torch.randn(4, n, generator=g) * 0.1
            base[key] = w
            tuned[key] = w + low + noise * torch.randn(o, n, generator=g)
            truth[key] = (tuned[key] - w).double().numpy()
        base[f"model.layers.{i}.norm.weight"] = torch.ones(32)
        tuned[f"model.layers.{i}.norm.weight"] = torch.ones(32) * 1.1
    _write_sharded(tmp_path / "base", base)
    _write_sharded(tmp_path / "tuned", tuned)
    return truth


def test_extract_is_near_optimal_and_cli_writes_peft(tmp_path):
    truth = _models(tmp_path)
    out = tmp_path / "lora"
    res = CliRunner().invoke(cli, ["extract", "--base", str(tmp_path / "base"), "--tuned",
                                   str(tmp_path / "tuned"), "-o", str(out), "--rank", "4",
                                   "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert len(info["skipped"]) == 3 and all("1-D" in s["reason"] for s in info["skipped"])
    adapter = lorakit.load(out)
    assert len(adapter.modules) == 6
    for key, diff in truth.items():
        m = adapter.modules[key[: -len(".weight")]]
        assert m.rank == 4
        s = np.linalg.svd(diff, compute_uv=False)
        optimum = np.sqrt((s[4:] ** 2).sum())
        err = np.linalg.norm(m.delta(torch.float64).numpy() - diff)
        assert err <= 1.01 * optimum, key


def test_extract_energy_policy_and_save_non_lora(tmp_path):
    _models(tmp_path, noise=0.0, seed=1)
    adapter, report = lorakit.compress.extract.extract(
        tmp_path / "base", tmp_path / "tuned",
        lorakit.lowrank.RankPolicy.from_options(energy=0.999), non_lora="save")
    assert {m.rank for m in adapter.modules.values()} == {4}
    assert len(report.saved) == 3 and "model.layers.0.norm.weight" in adapter.extras


def test_extract_memory_stays_bounded(tmp_path):
    """Peak RSS growth stays near a few tensors, not the whole (256 MiB) checkpoint pair."""
    g = torch.Generator().manual_seed(0)
    base = {f"w{i}.weight": torch.randn(2048, 2048, generator=g) for i in range(8)}  # 16 MiB each
    tuned = {k: v + 0.01 for k, v in base.items()}
    _write_sharded(tmp_path / "base", base, 4)
    _write_sharded(tmp_path / "tuned", tuned, 4)
    del base, tuned
    script = textwrap.dedent(f"""
        import resource, torch
        from lorakit.compress.extract import extract
        from lorakit.lowrank import RankPolicy
        torch.zeros(1) @ torch.zeros(1)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        extract({str(tmp_path / 'base')!r}, {str(tmp_path / 'tuned')!r}, RankPolicy.fixed(8))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True)
    growth_mib = int(out.stdout.strip().splitlines()[-1])
    print(f"peak RSS growth during extract: {growth_mib} MiB (checkpoints: 2 x 128 MiB)")
    assert growth_mib < 128
