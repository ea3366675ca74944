"""Bad input to ``lorakit transfer`` gets one clear line naming the file, key and problem."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from lorakit.cli import main
from lorakit.errors import ConfigMismatchError, CorruptFileError, InputNotFoundError, OptionError
from lorakit.transfer.pipeline import TransferOptions, transfer

from .conftest import write_jsonl


def run_cli(capsys, args) -> str:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorakit: error: ") and "\n" not in err
    return err


def base_args(tiny, tmp_path, **over):
    args = {"--source-model": tiny["source"], "--adapter": tiny["adapter"],
            "--target-model": tiny["target"], "--seeds": tiny["seeds"],
            "-o": tmp_path / "out", **over}
    return ["transfer", "--quiet"] + [x for kv in args.items() for x in kv]


def test_missing_model(tiny, tmp_path, capsys):
    err = run_cli(capsys, base_args(tiny, tmp_path, **{"--target-model": tmp_path / "nope"}))
    assert f"{tmp_path / 'nope'}: no such model folder or file" in err
    assert not (tmp_path / "out").exists()


def test_unloadable_model_folder(tiny, tmp_path):
    empty = tmp_path / "empty_model"
    empty.mkdir()
    from lorakit.transfer.models import load_causal_lm

    with pytest.raises(InputNotFoundError, match="cannot load the tokenizer"):
        load_causal_lm(empty)


def test_seeds_not_jsonl(tiny, tmp_path, capsys):
    bad = tmp_path / "seeds.jsonl"
    bad.write_text('{"input": "a", "output": "b"}\n{"input": "c", "output": \n')
    err = run_cli(capsys, base_args(tiny, tmp_path, **{"--seeds": bad}))
    assert f"{bad}: line 2: not valid JSON" in err
    with pytest.raises(CorruptFileError, match="line 1: field 'output' is missing"):
        transfer(tiny["source"], tiny["adapter"], tiny["target"],
                 write_jsonl(tmp_path / "s2.jsonl", [{"input": "x"}]), tmp_path / "o2")
    with pytest.raises(CorruptFileError, match="line 1: expected a JSON object, got list"):
        transfer(tiny["source"], tiny["adapter"], tiny["target"],
                 write_jsonl(tmp_path / "s3.jsonl", [[1, 2]]), tmp_path / "o3")


def test_fewer_seeds_than_asked(tiny, tmp_path, capsys):
    err = run_cli(capsys, [*base_args(tiny, tmp_path), "--num-seeds", "8"])
    assert f"{tiny['seeds']}: holds 6 examples but 8 were asked for" in err


def test_discriminator_for_another_task(tiny, tmp_path, capsys):
    disc = tmp_path / "disc"
    disc.mkdir()
    (disc / "discriminator.json").write_text(json.dumps(
        {"format": "lorakit-discriminator", "task": "date", "base_model": str(tiny["source"])}))
    err = run_cli(capsys, [*base_args(tiny, tmp_path), "--discriminator", disc, "--task", "add"])
    assert "discriminator.json: key 'task': this discriminator was trained for task 'date', " \
           "not 'add'" in err
    with pytest.raises(OptionError, match="--task is needed"):
        transfer(tiny["source"], tiny["adapter"], tiny["target"], tiny["seeds"],
                 tmp_path / "o", discriminator=disc)
    with pytest.raises(InputNotFoundError, match="not a lorakit discriminator"):
        transfer(tiny["source"], tiny["adapter"], tiny["target"], tiny["seeds"],
                 tmp_path / "o", discriminator=tmp_path, options=TransferOptions(task="add"))


def test_adapter_for_another_base_model(tiny, tmp_path, capsys):
    other = tmp_path / "adapter"
    shutil.copytree(tiny["adapter"], other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-2-7b-hf"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    err = run_cli(capsys, base_args(tiny, tmp_path, **{"--adapter": other}))
    assert "adapter_config.json: key 'base_model_name_or_path': the adapter was trained on " \
           "'meta-llama/Llama-2-7b-hf' but --source-model is" in err
    with pytest.raises(ConfigMismatchError):
        transfer(tiny["target"], tiny["adapter"], tiny["target"], tiny["seeds"], tmp_path / "o")
    # a local copy of the Hub model the adapter names is accepted when named by --source-name
    from dataclasses import replace

    from lorakit.transfer.models import ModelRef, check_adapter_base

    local = ModelRef.parse(tiny["source"])
    with pytest.raises(ConfigMismatchError, match="--source-name"):
        check_adapter_base(other, local)
    check_adapter_base(other, replace(local, alias="meta-llama/Llama-2-7b-hf"))


def test_missing_adapter_and_existing_output(tiny, tmp_path, capsys):
    err = run_cli(capsys, base_args(tiny, tmp_path, **{"--adapter": tmp_path / "none"}))
    assert "no such adapter folder" in err
    (tmp_path / "out").mkdir()
    err = run_cli(capsys, base_args(tiny, tmp_path))
    assert "out" in err and "--force" in err


def test_usage_errors(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["transfer", "--source-model", str(tiny["source"]), "--seeds", str(tiny["seeds"])])
    assert exc.value.code == 2
    assert "missing option(s): --adapter, --target-model, -o/--out" in capsys.readouterr().err
    err = run_cli(capsys, [*base_args(tiny, tmp_path), "--prompt-template", "no field"])
    assert "has no {input} field" in err
    err = run_cli(capsys, [*base_args(tiny, tmp_path), "--keep-top", "0.5",
                           "--filter-threshold", "0.4"])
    assert "not both" in err


def test_missing_extra(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    err = run_cli(capsys, base_args(tiny, tmp_path))
    assert "lorakit transfer needs transformers and peft (peft is missing)" in err
    assert "pip install 'lorakit[transfer]'" in err


def test_help_without_the_extra():
    code = ("import sys; sys.modules['transformers'] = None; sys.modules['peft'] = None; "
            "from lorakit.cli import main; main(['transfer', '--help'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--source-model" in out.stdout and "without its training data" in out.stdout


def test_discriminator_base_model_missing(tmp_path):
    from lorakit.transfer.discriminator import Discriminator

    disc = tmp_path / "disc"
    disc.mkdir()
    (disc / "discriminator.json").write_text(json.dumps(
        {"format": "lorakit-discriminator", "task": "add", "base_model": str(tmp_path / "gone")}))
    with pytest.raises(InputNotFoundError, match="pass its local copy with --discriminator-model"):
        Discriminator.load(disc, task="add")
    (disc / "discriminator.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match="discriminator.json: not valid JSON"):
        Discriminator.load(disc, task="add")
