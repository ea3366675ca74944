"""Every real file in ../shared/real_adapters_next loads, or is refused by name, as its MANIFEST says.

Parametrised over that folder's MANIFEST.json (a new entry without an expectation below fails,
so it cannot be skipped silently); skipped with a reason when the folder is absent. The LoKr file
is checked module by module against numpy computed from the raw tensors with LyCORIS's
definitions (tests/formats/_lycoris_ref.py), and resized / svd-merged through the CLI.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REAL_ADAPTERS
from safetensors import safe_open

import lorakit
from lorakit.errors import UnknownLayoutError

from . import _lycoris_ref as ref

pytestmark = pytest.mark.real

NEXT = Path(os.environ.get("LORAKIT_REAL_ADAPTERS_NEXT")
            or REAL_ADAPTERS.parent / "real_adapters_next")
REASON = (f"real adapters not available: {NEXT / 'MANIFEST.json'} is missing (they live in "
          "../shared/real_adapters_next beside the repository, not in it)")

# MANIFEST "layout" -> what lorakit does with it: ("loads", layout) or ("refused", error, words)
EXPECT = {
    "lycoris-lokr": ("loads", "lycoris"),
    "cloneofsimo": ("refused", UnknownLayoutError, ["cloneofsimo", "positional", ":0:down"]),
    "custom-positional": ("refused", UnknownLayoutError, ["LoRA-ViT", "Sam_LoRA", "w_a_000"]),
}


@lru_cache(maxsize=1)
def _manifest() -> tuple[dict, ...]:
    f = NEXT / "MANIFEST.json"
    return tuple(json.loads(f.read_text(encoding="utf-8"))) if f.is_file() else ()


def _params(where=lambda e: True):
    if not _manifest():
        return [pytest.param(None, id="no-real-adapters-next", marks=pytest.mark.skip(REASON))]
    return [pytest.param(e, id=e["name"]) for e in _manifest() if where(e)]


def _file(entry: dict) -> Path:
    return NEXT / entry["name"] / entry["weights_file"]


def _lokr_entry() -> dict:
    for e in _manifest():
        if e["layout"] == "lycoris-lokr":
            return e
    pytest.skip(REASON if not _manifest() else "no LoKr file in real_adapters_next")


@lru_cache(maxsize=1)
def _raw_groups(file: str) -> dict[str, dict[str, torch.Tensor]]:
    """The file's tensors grouped by kohya module name, read with safetensors directly."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(file, framework="pt") as f:
        for k in f.keys():  # noqa: SIM118
            stem, _, suffix = k.partition(".")
            groups.setdefault(stem, {})[suffix] = f.get_tensor(k)
    return groups


def _norm(key: str) -> str:
    comp, _, rest = key.partition(".")
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[comp]
    return prefix + rest.replace(".", "_")


@pytest.mark.parametrize("entry", _params())
def test_loads_or_is_refused_as_manifest_says(entry):
    assert entry["layout"] in EXPECT, f"add an expectation for MANIFEST layout {entry['layout']}"
    f = _file(entry)
    assert hashlib.sha256(f.read_bytes()).hexdigest() == entry["sha256"]
    what = EXPECT[entry["layout"]]
    if what[0] == "refused":
        with pytest.raises(what[1]) as e:
            lorakit.load(f.parent)
        msg = str(e.value)
        assert f.name in msg, msg
        for w in what[2]:
            assert w in msg, msg
        return
    a = lorakit.load(f.parent)
    assert a.layout == what[1] and a.source_format == "kohya"
    assert len(a.modules) == entry["n_lora_pairs"]
    assert a.dtypes() == [{"F16": "float16", "F32": "float32"}[entry["dtype"]]]
    assert a.base_model and "animefull" in a.base_model
    from lorakit.formats.coverage import coverage, coverage_line
    from lorakit.formats.families.sd import SD15

    # an SD 1.x file: its text encoder is CLIP-L's 12 layers, not SD 2.x's 23
    assert "text encoder layers 12/12" in coverage_line(coverage(a, SD15))


DENSE_LIMIT = 1 << 21  # updates up to this many entries are compared densely


def _probe(g: dict, m, rng) -> tuple[np.ndarray, np.ndarray]:
    """``(lorakit, reference)`` products of the update with 4 random vectors; the reference is
    the entry-wise definition ``kron(w1, w2)[(i1, i2), (j1, j2)] = w1[i1, j1] * w2[i2, j2]``
    contracted directly (einsum), for updates too large to compare densely in a test."""
    w1 = g["lokr_w1_a"].double().numpy() @ g["lokr_w1_b"].double().numpy()  # (a, c)
    w2 = g["lokr_w2_a"].double().numpy() @ g["lokr_w2_b"].double().numpy()  # (b, n)
    x = rng.standard_normal((w1.shape[1] * w2.shape[1], 4))
    want = np.einsum("ac,bn,cnp->abp", w1, w2, x.reshape(w1.shape[1], w2.shape[1], 4),
                     optimize=True)
    up, down = m.up_matrix(torch.float64).numpy(), m.down_matrix(torch.float64).numpy()
    return m.scale * (up @ (down @ x)), want.reshape(-1, 4) * _scale(g)


def _scale(g: dict) -> float:
    """LyCORIS LoKr with both factors low-rank: alpha / dim, dim = lokr_w1_b.shape[0]."""
    return float(g["alpha"]) / g["lokr_w1_b"].shape[0]


def test_real_lokr_every_module_is_exact():
    entry = _lokr_entry()
    f = _file(entry)
    a = lorakit.load(f)
    groups = _raw_groups(str(f))
    assert {_norm(k) for k in a.modules} == set(groups)
    worst, dense, rng = 0.0, 0, np.random.default_rng(0)
    for key, m in a.modules.items():
        g = groups[_norm(key)]
        assert set(g) == {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "alpha"}
        assert m.origin == "lokr" and m.rank == 16 and m.dtype == torch.float16
        assert _scale(g) == 1.0  # dim 4, alpha 4 in this file
        if m.out_features * m.in_features * int(np.prod(m.kernel or (1,))) <= DENSE_LIMIT:
            w, s = ref.lokr(g)  # kron(w1, w2) from the raw fp16 tensors in float64
            want = s * w.reshape(w.shape[0], -1)
            got = m.delta(torch.float64).numpy().reshape(want.shape[0], -1)
            dense += 1
        else:
            got, want = _probe(g, m, rng)
        if np.linalg.norm(want) == 0:
            assert not got.any(), key
            continue
        worst = max(worst, float(np.linalg.norm(got - want) / np.linalg.norm(want)))
    assert worst < 1e-6, worst
    assert dense > len(a.modules) // 2


def test_real_lokr_conv_kernels():
    a = lorakit.load(_file(_lokr_entry()))
    shapes = {k: tuple(m.delta_shape) for k, m in a.modules.items()}
    # SD1.x UNet shapes (diffusers UNet2DConditionModel, runwayml/stable-diffusion-v1-5 config)
    assert shapes["unet.down_blocks.0.resnets.0.conv1"] == (320, 320, 3, 3)
    assert shapes["unet.mid_block.resnets.0.conv2"] == (1280, 1280, 3, 3)
    assert shapes["unet.down_blocks.0.downsamplers.0.conv"] == (320, 320, 3, 3)
    assert shapes["unet.up_blocks.1.resnets.0.conv_shortcut"] == (1280, 2560, 1, 1)
    assert shapes["unet.down_blocks.0.attentions.0.proj_in"] == (320, 320, 1, 1)
    assert shapes["unet.down_blocks.0.resnets.0.time_emb_proj"] == (320, 1280)
    assert shapes["text_encoder.text_model.encoder.layers.0.mlp.fc1"] == (3072, 768)
    assert shapes["text_encoder.text_model.encoder.layers.0.mlp.fc2"] == (768, 3072)


SAMPLE = ["text_encoder.text_model.encoder.layers.0.mlp.fc1",
          "unet.down_blocks.0.resnets.0.conv1",  # all-zero in this file (w2 untrained)
          "unet.down_blocks.1.resnets.0.conv1", "unet.up_blocks.1.resnets.0.conv_shortcut",
          "unet.down_blocks.0.attentions.0.proj_in",
          "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
          "unet.up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj"]


def _check_truncation(out: Path, weight: float, k: int):
    b = lorakit.load(out)
    assert b.layout == "kohya" and b.dtypes() == ["float16"]
    groups = _raw_groups(str(_file(_lokr_entry())))
    for key in SAMPLE:
        w, s = ref.lokr(groups[_norm(key)])
        d = weight * s * w.reshape(w.shape[0], -1)
        _, err = ref.truncated(d, k)
        got = b.modules[key].delta(torch.float64).numpy().reshape(d.shape[0], -1)
        assert b.modules[key].rank == k
        if err == 0:  # an all-zero update stays zero
            assert not got.any() and not d.any(), key
            continue
        # fp16 output factors: the error matches Eckart-Young to fp16 precision
        assert abs(float(np.linalg.norm(d - got)) / err - 1) < 2e-3, key


def test_real_lokr_cli_resize(tmp_path):
    f = _file(_lokr_entry())
    r = subprocess.run([sys.executable, "-m", "lorakit.cli", "resize", str(f), "--rank", "4",
                        "-o", str(tmp_path / "r.safetensors"), "--quiet", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _check_truncation(tmp_path / "r.safetensors", 1.0, 4)


def test_real_lokr_cli_svd_merge(tmp_path):
    f = _file(_lokr_entry())
    g = tmp_path / "again.safetensors"  # the same file under a second name (outside the repo)
    g.write_bytes(f.read_bytes())
    r = subprocess.run([sys.executable, "-m", "lorakit.cli", "merge", str(f), str(g),
                        "--method", "svd", "--weights", "1,0.5", "--rank", "8",
                        "-o", str(tmp_path / "m.safetensors"), "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _check_truncation(tmp_path / "m.safetensors", 1.5, 8)


def test_real_lokr_converts_exactly(tmp_path):
    a = lorakit.load(_file(_lokr_entry()))
    out = lorakit.save(a, tmp_path / "k.safetensors", "kohya")
    b = lorakit.load(out)
    assert b.layout == "kohya" and b.metadata["ss_network_module"] == "networks.lora"
    for key in SAMPLE:
        assert torch.equal(b.modules[key].delta(torch.float64), a.modules[key].delta(torch.float64))
