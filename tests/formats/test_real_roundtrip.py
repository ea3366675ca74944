"""Every real adapter in ../shared/real_adapters loads, matches its MANIFEST, and survives a
load -> save (own format) -> load round trip bit for bit.

Parametrised over MANIFEST.json, so a new folder is covered without code changes. The expected
values come from the MANIFEST, the adapter's own config, and an independent reader (tests/formats/
_raw.py), never from lorakit itself.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import manifest_params, require_real
from safetensors import safe_open

import lorakit

from ._raw import module_delta, norm_key, read_any, rel_err

pytestmark = pytest.mark.real

# MANIFEST "format" -> (lorakit source_format, lorakit layout)
LAYOUTS = {
    "peft": ("peft", None),
    "diffusers_unet_lora_down_up": ("diffusers", "diffusers_lora_down_up"),
    "diffusers_attn_processor_legacy": ("diffusers", "diffusers_legacy_processor"),
    "kohya_like": ("kohya", "kohya_like"),
    "kohya": ("kohya", "kohya"),
    "diffusers": ("diffusers", "diffusers"),
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _config(entry: dict) -> dict:
    cfg = require_real(entry["name"]) / "adapter_config.json"
    return json.loads(cfg.read_text()) if cfg.exists() else {}


def _stores_alpha(file: Path) -> bool:
    """Whether a diffusers/kohya file stores alphas (``.alpha`` tensors or diffusers metadata)."""
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
        return "lora_adapter_metadata" in meta or any(k.endswith("alpha") for k in f.keys())  # noqa: SIM118


def _family(fmt: str) -> str:
    return LAYOUTS.get(fmt, (fmt.split("_")[0], None))[0]


@pytest.fixture(scope="module")
def loaded():
    """Each adapter loaded once per module (keyed by name)."""
    cache: dict[str, lorakit.Adapter] = {}

    def get(entry: dict) -> lorakit.Adapter:
        if entry["name"] not in cache:
            cache[entry["name"]] = lorakit.load(require_real(entry["name"]))
        return cache[entry["name"]]

    return get


@pytest.mark.parametrize("entry", manifest_params())
def test_loads_and_matches_manifest(entry, loaded):
    folder = require_real(entry["name"])
    a = loaded(entry)
    fmt, layout = LAYOUTS.get(entry["format"], (_family(entry["format"]), None))
    assert a.source_format == fmt
    if layout:
        assert a.layout == layout
    # module count and ranks per module
    assert len(a.modules) == entry["n_lora_pairs"]
    found = Counter(str(m.rank) for m in a.modules.values())
    assert dict(found) == {k: int(v) for k, v in entry["ranks_found"].items()}
    cfg = _config(entry)
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if entry.get("r") is not None and not (entry.get("cfg_rank_pattern") or {}):
        if peft_type == "ADALORA":
            # AdaLoRA saves its initial rank (init_r), not the config's r (a target budget).
            assert {m.rank for m in a.modules.values()} == {int(cfg.get("init_r", entry["r"]))}
        else:
            assert {m.rank for m in a.modules.values()} == {int(entry["r"])}
    # extras (heads, modules_to_save) are kept, nothing is dropped
    if "n_non_lora_tensors" in entry:
        assert len(a.extras) == entry["n_non_lora_tensors"]
    # scale: from the MANIFEST's lora_alpha (computed here), else alpha = r (scale 1)
    alpha = entry.get("lora_alpha")
    for m in a.modules.values():
        r = m.rank
        if alpha is None:
            continue  # checked below against the file's own alphas (or alpha = r)
        if peft_type == "ADALORA":
            # peft.py: A <- E * A, alpha <- lora_alpha * r / (r + 1e-5) with the float32 ranknum,
            # i.e. scale = lora_alpha / (ranknum + 1e-5) as in PEFT's AdaLoRA forward.
            ranknum = float(np.float32(r) + np.float32(1e-5))
            assert m.scale == pytest.approx(alpha / ranknum, rel=1e-12)
            assert m.scale == pytest.approx(alpha / (r + 1e-5), rel=1e-6)
        else:
            denom = math.sqrt(r) if entry.get("use_rslora") else r
            assert m.scale == pytest.approx(alpha / denom, rel=1e-15)
            assert m.alpha == float(alpha)
    if alpha is None:
        raw = read_any(folder)
        assert {k: m.scale for k, m in a.modules.items()} == \
            {k: raw[norm_key(k)].scale for k in a.modules}
        if not _stores_alpha(folder / entry["weights_file"]):
            assert {m.scale for m in a.modules.values()} == {1.0}  # no alpha stored: alpha = r
    if peft_type == "ADALORA":
        assert a.layout == "peft_adalora"


@pytest.mark.parametrize("entry", manifest_params())
def test_load_matches_independent_reader(entry, loaded):
    """Every module's scale * B @ A equals the one read from the file without lorakit."""
    a = loaded(entry)
    raw = read_any(require_real(entry["name"]))
    assert set(raw) == {norm_key(k) for k in a.modules}
    tol = 1e-6 if a.layout == "peft_adalora" else 1e-12
    for key, m in a.modules.items():
        ref = raw[norm_key(key)]
        assert m.rank == ref.rank
        assert m.scale == pytest.approx(ref.scale, rel=1e-12)
        assert rel_err(module_delta(m), ref.delta()) < tol, key


@pytest.mark.parametrize("entry", manifest_params())
def test_round_trip_own_format(entry, loaded, tmp_path):
    folder = require_real(entry["name"])
    weights = folder / entry["weights_file"]
    before = _sha256(weights)
    if entry.get("sha256"):
        assert before == entry["sha256"], "the shared fixture changed on disk"
    a = loaded(entry)
    out = tmp_path / ("out" if a.source_format == "peft" else "out.safetensors")
    written = lorakit.save(a, out)
    b = lorakit.load(written)

    assert b.source_format == a.source_format
    assert list(b.modules) == list(a.modules)
    for key, ma in a.modules.items():
        mb = b.modules[key]
        assert torch.equal(mb.down, ma.down), key
        assert torch.equal(mb.up, ma.up), key
        assert mb.down.dtype == ma.down.dtype and mb.up.dtype == ma.up.dtype
        for name in ("magnitude", "bias"):
            ta, tb = getattr(ma, name), getattr(mb, name)
            assert (ta is None) == (tb is None), (key, name)
            if ta is not None:
                assert torch.equal(tb.reshape(ta.shape), ta), (key, name)
        assert mb.alpha == ma.alpha and mb.rslora == ma.rslora and mb.kind == ma.kind
    assert list(b.extras) == list(a.extras)
    for k, t in a.extras.items():
        assert torch.equal(b.extras[k], t) and b.extras[k].dtype == t.dtype, k

    # The effective update scale * B @ A of every reloaded module, computed here in float64, equals
    # the one the original file defines (read without lorakit).
    ref = read_any(folder)
    tol = 1e-6 if a.layout == "peft_adalora" else 1e-12
    for key, mb in b.modules.items():
        assert rel_err(module_delta(mb), ref[norm_key(key)].delta()) < tol, key
    # What is on disk reads back, without lorakit, to the same factors and scales.
    on_disk = read_any(written)
    assert set(on_disk) == set(ref)
    for k, m in on_disk.items():
        if a.layout == "peft_adalora":  # E was folded into A in float32 by lorakit
            assert rel_err(m.delta(), ref[k].delta()) < tol, k
        else:
            assert np.array_equal(m.up, ref[k].up) and np.array_equal(m.down, ref[k].down), k
            assert m.scale == pytest.approx(ref[k].scale, rel=1e-15), k
    # the input was not touched
    assert _sha256(weights) == before


@pytest.mark.parametrize("entry", manifest_params(lambda e: e["format"] == "peft"))
def test_round_trip_keeps_peft_config(entry, loaded, tmp_path):
    """A PEFT round trip keeps the user's config (r, alpha, targets, task, modules_to_save)."""
    a = loaded(entry)
    cfg = _config(entry)
    written = lorakit.save(a, tmp_path / "out")
    new = json.loads((written / "adapter_config.json").read_text())
    if str(cfg.get("peft_type", "LORA")).upper() == "LORA":
        assert new == cfg
    else:  # AdaLoRA is written as the equivalent plain LoRA
        assert new["peft_type"] == "LORA"
        for k in ("target_modules", "task_type", "modules_to_save", "base_model_name_or_path"):
            assert new[k] == cfg[k]
        assert "lora_E" not in " ".join(read_any(written))
