"""``lorakit merge --method regmean`` through the real CLI process and a recipe: a tiny Llama
saved as a model folder (offline), PEFT adapters, calibration files; the API gives the same
bytes, the Gram cache is reused, errors are one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.adapter import Adapter, LoraModule

pytest.importorskip("transformers", reason="regmean needs the transfer extra")

from tests.merge.test_regmean import PROMPTS, char_tokenizer  # noqa: E402

KEYS = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.mlp.down_proj"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("regmean_cli")
    tok = char_tokenizer()
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    g = torch.Generator().manual_seed(2)
    srcs, calib = [], []
    for i, prompts in enumerate(PROMPTS):
        mods = {}
        for k in KEYS:
            w = model.get_submodule(k).weight
            mods[k] = LoraModule(torch.randn(2 + i, w.shape[1], generator=g) * 0.2,
                                 torch.randn(w.shape[0], 2 + i, generator=g) * 0.2, alpha=4.0)
        folder = root / f"task{i}"
        lorakit.save(Adapter(modules=mods, base_model="tiny"), folder, "peft")
        srcs.append(folder)
        f = root / "calib" / f"task{i}.txt"
        f.parent.mkdir(exist_ok=True)
        f.write_text("\n".join(prompts) + "\n")
        calib.append(f)
    return root, srcs, calib


def _cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "lorakit.cli", *map(str, args)],
                       capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(r.stderr)
    return r


def test_cli_regmean_matches_api_and_reuses_grams(setup, tmp_path):
    root, srcs, calib = setup
    grams = tmp_path / "grams"
    out = tmp_path / "merged"
    r = _cli("merge", *srcs, "--method", "regmean", "--model", root / "model",
             "--calibration", ",".join(map(str, calib)), "--grams", grams,
             "--option", "shrink=0.5", "--rank", "4", "-o", out, "--json")
    info = json.loads(r.stdout)
    assert info["ranks"] == [4]
    assert len(list(grams.iterdir())) == 3
    api = lorakit.merge([lorakit.load(s) for s in srcs], "regmean", model=str(root / "model"),
                        calibration=calib, shrink=0.5,
                        policy=lorakit.lowrank.RankPolicy.fixed(4))
    got = lorakit.load(out)
    for k in KEYS:
        assert torch.allclose(got.modules[k].delta(), api.modules[k].delta(), atol=1e-6)
    # a re-merge from the cache, with a calibration folder: same Grams, no new folder
    again = tmp_path / "again"
    _cli("merge", *srcs, "--method", "regmean", "--model", root / "model",
         "--calibration", root / "calib", "--grams", grams, "--rank", "4",
         "--option", "shrink=0.5", "-o", again)
    assert len(list(grams.iterdir())) == 3
    b = lorakit.load(again)
    for k in KEYS:
        assert torch.equal(b.modules[k].up, got.modules[k].up)


@pytest.mark.parametrize("args, words", [
    (["--calibration", "CAL1"], "2 calibration sets for 3 adapters"),
    ([], "needs calibration prompts"),
    (["--calibration", "CALDIR", "--model", "nowhere/here/x"], "no such model"),
])
def test_cli_errors_are_one_line(setup, tmp_path, args, words):
    root, srcs, calib = setup
    args = [a.replace("CAL1", f"{calib[0]},{calib[1]}").replace("CALDIR", str(root / "calib"))
            for a in args]
    if "--model" not in args:
        args += ["--model", str(root / "model")]
    r = _cli("merge", *srcs, "--method", "regmean", *args, "-o", tmp_path / "x", check=False)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], r.stderr
    assert not (tmp_path / "x").exists()


def test_cli_space_option(setup, tmp_path):
    _, srcs, _ = setup
    out = tmp_path / "core"
    _cli("merge", *srcs, "--method", "ties", "--space", "core", "-o", out)
    assert lorakit.load(out).modules
    r = _cli("merge", *srcs, "--method", "linear", "--space", "core", "-o", tmp_path / "y",
             check=False)
    assert r.returncode == 1 and "has no option 'space'" in r.stderr


def test_recipe_regmean_step(setup, tmp_path):
    from lorakit.compose import run_recipe

    root, srcs, calib = setup
    steps = [f"  - load: t{i}\n    source: {s}\n" for i, s in enumerate(srcs)]
    text = ("steps:\n" + "".join(steps)
            + "  - merge: m\n    inputs: [t0, t1, t2]\n    method: regmean\n"
            f"    model: {root / 'model'}\n    calibration: {root / 'calib'}\n"
            "    options: {shrink: 0.5}\n    rank: 4\n"
            f"  - save: out\n    input: m\n    output: {tmp_path / 'out'}\n")
    (tmp_path / "r.yaml").write_text(text)
    run_recipe(tmp_path / "r.yaml")
    got = lorakit.load(tmp_path / "out")
    api = lorakit.merge([lorakit.load(s) for s in srcs], "regmean", model=str(root / "model"),
                        calibration=root / "calib", shrink=0.5,
                        policy=lorakit.lowrank.RankPolicy.fixed(4))
    for k in KEYS:
        assert torch.allclose(got.modules[k].delta(), api.modules[k].delta(), atol=1e-6)


def test_adapter_names_follow_the_sources(setup):
    _, srcs, _ = setup
    from lorakit.calibrate.data import adapter_name

    assert [adapter_name(str(s), i) for i, s in enumerate(srcs)] == ["task0", "task1", "task2"]
    assert adapter_name(str(Path("x/lora.safetensors")), 0) == "lora"
