"""Every merge method through the CLI on the real mergeable groups of ../shared/real_adapters."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import lorakit
from lorakit.cli import cli
from tests.conftest import manifest_entries

METHODS = ["linear", "task_arithmetic", "cat", "svd", "factor_linear", "ties", "dare_linear",
           "dare_ties", "magnitude_prune", "lego", "knots"]
EXACT = {"linear", "task_arithmetic", "cat"}


def _groups() -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for e in manifest_entries():
        if e.get("mergeable_group"):
            groups.setdefault(e["mergeable_group"], []).append(e["name"])
    return {g: sorted(v) for g, v in groups.items() if len(v) > 1}


GROUPS = _groups()


def _dense(m) -> np.ndarray:
    r = m.down.shape[0]
    scale = m.alpha / (np.sqrt(r) if m.rslora else r)
    return scale * m.up.double().numpy().reshape(m.up.shape[0], r) @ \
        m.down.double().numpy().reshape(r, -1)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("group", sorted(GROUPS))
def test_method_on_real_group(group, method, real_adapters, tmp_path):
    names = GROUPS[group]
    srcs = [str(real_adapters / n) for n in names]
    inputs = [lorakit.load(s) for s in srcs]
    refuse = method == "factor_linear" and len({r for a in inputs
                                                 for r in a.ranks().values()}) > 1
    out = tmp_path / "merged"
    fmt = "peft" if inputs[0].source_format == "peft" else "diffusers"
    if fmt == "diffusers":
        out = tmp_path / "merged.safetensors"
    args = ["merge", *srcs, "--method", method, "-o", str(out), "--extras", "first", "--to", fmt,
            "--json"]
    if method in ("lego",):
        args += ["--option", "k=8"]
    res = CliRunner().invoke(cli, args)
    if refuse:  # factor_linear sums A and B separately: it needs equal ranks, and says so
        assert res.exit_code != 0 and "needs equal ranks" in str(res.exception)
        assert not out.exists()
        return
    assert res.exit_code == 0, (res.output, res.exception)
    info = json.loads(res.output)
    merged = lorakit.load(out)
    keys = []
    for a in inputs:
        keys += [k for k in a.modules if k not in keys]
    assert set(merged.modules) == set(keys)
    assert info["modules"] == len(keys)
    if method in EXACT:
        for key, m in merged.modules.items():
            want = sum(_dense(a.modules[key]) for a in inputs if key in a.modules)
            got = _dense(m)
            assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want), key
    for m in merged.modules.values():
        assert torch.isfinite(m.up).all() and torch.isfinite(m.down).all()
