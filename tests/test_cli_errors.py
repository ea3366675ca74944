"""The CLI's error contract: bad input prints exactly one line on stderr, ``lorakit: error: ...``
naming the file and the problem, and exits 1; ``LORAKIT_DEBUG=1`` shows the traceback instead.

The contract lives in :func:`lorakit.cli.main` (the console script), not in the raw click group
``lorakit.cli.cli``; the tests run it as a real process (``python -m lorakit.cli`` and the installed
``lorakit`` script) and in process through ``main(argv)``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorakit.cli import main

KOHYA = "lora_unet_mid_block_attentions_0_proj_in"
PEFT_MOD = "model.layers.0.self_attn.q_proj"
LFS = "version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize 4096\n".format("0" * 64)


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def kohya(path: Path, **replace: torch.Tensor) -> Path:
    t = {f"{KOHYA}.lora_down.weight": rand(4, 8, seed=1),
         f"{KOHYA}.lora_up.weight": rand(6, 4, seed=2), f"{KOHYA}.alpha": torch.tensor(4.0)}
    t.update({f"{KOHYA}.{k}": v for k, v in replace.items()})
    save_file(t, str(path))
    return path


def peft(folder: Path, config: dict | None = None, **tensors: torch.Tensor) -> Path:
    folder.mkdir(parents=True)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    p = f"base_model.model.{PEFT_MOD}"
    t = {f"{p}.lora_A.weight": rand(4, 8, seed=3), f"{p}.lora_B.weight": rand(8, 4, seed=4)}
    t.update({f"{p}.{k}.weight": v for k, v in tensors.items()})
    save_file(t, str(folder / "adapter_model.safetensors"))
    return folder


def _nan_up() -> torch.Tensor:
    up = rand(6, 4, seed=2)
    up[1, 1] = float("nan")
    return up


def _truncated(tmp: Path) -> Path:
    p = kohya(tmp / "lora.safetensors")
    p.write_bytes(p.read_bytes()[:-7])
    return p


def _bad_json(tmp: Path) -> Path:
    p = kohya(tmp / "lora.safetensors")
    raw = bytearray(p.read_bytes())
    raw[8] = ord("!")
    p.write_bytes(bytes(raw))
    return p


def _lfs(tmp: Path) -> Path:
    p = tmp / "lora.safetensors"
    p.write_text(LFS)
    return p


def _no_config(tmp: Path) -> Path:
    folder = peft(tmp / "a")
    (folder / "adapter_config.json").unlink()
    return folder / "adapter_model.safetensors"


def _empty_dir(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _empty_file(tmp: Path) -> Path:
    (tmp / "lora.safetensors").write_bytes(b"")
    return tmp / "lora.safetensors"


class Custom:
    """A custom class in the pickle: weights-only loading refuses it."""


def _pickle(tmp: Path) -> Path:
    p = tmp / "adapter.bin"
    torch.save({"w": rand(2, 2), "obj": Custom()}, p)
    return p


def _lfs_peft(tmp: Path) -> tuple[Path, Path]:
    folder = peft(tmp / "a")
    (folder / "adapter_model.safetensors").write_text(LFS)
    return folder, folder / "adapter_model.safetensors"


# name -> (build(tmp) -> (path given to the CLI, path the message names), problem words)
CASES = {
    "missing": (lambda t: (t / "nope.safetensors",) * 2, ["no such file"]),
    "empty_file": (lambda t: (_empty_file(t),) * 2, ["empty"]),
    "empty_folder": (lambda t: (_empty_dir(t),) * 2, ["no adapter files"]),
    "lfs_pointer": (lambda t: (_lfs(t),) * 2, ["Git LFS pointer"]),
    "lfs_pointer_peft": (_lfs_peft, ["Git LFS pointer"]),
    "truncated": (lambda t: (_truncated(t),) * 2, ["truncated"]),
    "corrupt_json": (lambda t: (_bad_json(t),) * 2, ["not valid JSON"]),
    "rank_mismatch_config": (lambda t: (peft(t / "a", {"r": 8}), t / "a" / "adapter_config.json"),
                             ["rank 8", "rank 4", PEFT_MOD]),
    "peft_without_config": (lambda t: (_no_config(t),) * 2, ["without adapter_config.json"]),
    "lora_a_without_b": (lambda t: (_a_only(t), t / "a" / "adapter_model.safetensors"),
                         ["lora_B", "missing", PEFT_MOD]),
    "ab_shape": (lambda t: (kohya(t / "l.safetensors", **{"lora_up.weight": rand(6, 3)}),) * 2,
                 ["rank mismatch", "unet.mid_block.attentions.0.proj_in"]),
    "nan_lora_b": (lambda t: (kohya(t / "l.safetensors", **{"lora_up.weight": _nan_up()}),) * 2,
                   ["lora_B", "NaN or Inf"]),
    "inf_alpha": (lambda t: (kohya(t / "l.safetensors", alpha=torch.tensor(float("inf"))),) * 2,
                  ["alpha is inf", f"{KOHYA}.alpha"]),
    "unknown_layout": (lambda t: (_unknown(t),) * 2, ["no LoRA layout", "encoder.x.weight"]),
    "loha": (lambda t: (kohya(t / "l.safetensors", hada_w1_a=rand(6, 4)),) * 2,
             ["LoHa", f"{KOHYA}.hada_w1_a"]),
    "peft_type_loha": (lambda t: (peft(t / "a", {"peft_type": "LOHA"}),
                                  t / "a" / "adapter_config.json"), ["LOHA", "not a LoRA"]),
    "pickle": (lambda t: (_pickle(t),) * 2, ["weights-only"]),
}


def _a_only(tmp: Path) -> Path:
    folder = peft(tmp / "a")
    save_file({f"base_model.model.{PEFT_MOD}.lora_A.weight": rand(4, 8)},
              str(folder / "adapter_model.safetensors"))
    return folder


def _unknown(tmp: Path) -> Path:
    p = tmp / "weights.safetensors"
    save_file({"encoder.x.weight": rand(2, 2)}, str(p))
    return p


def build(name: str, tmp: Path) -> tuple[Path, Path, list[str]]:
    make, words = CASES[name]
    given, named = make(tmp)
    return given, named, words


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def assert_one_line(err: str, named: Path, words: list[str]) -> None:
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), f"expected one line on stderr, got {err!r}"
    line = lines[0]
    assert line.startswith("lorakit: error: "), line
    assert str(named) in line, (str(named), line)
    for w in words:
        assert w.lower() in line.lower(), (w, line)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_bad_input_one_line(tmp_path, capsys, name, command):
    given, named, words = build(name, tmp_path)
    out_path = tmp_path / "out"
    args = (["inspect", str(given), "--json"] if command == "inspect"
            else ["convert", str(given), "--to", "kohya", "-o", str(out_path)])
    code, out, err = run_main(capsys, *args)
    assert code == 1
    assert_one_line(err, named, words)
    assert out == ""
    assert not out_path.exists()
    assert not [p for p in tmp_path.rglob("*.tmp")], "a temporary file was left behind"


def test_existing_output_one_line(tmp_path, capsys):
    src = kohya(tmp_path / "in.safetensors")
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep")
    code, _, err = run_main(capsys, "convert", str(src), "--to", "diffusers", "-o", str(out))
    assert code == 1
    assert_one_line(err, out, ["already exists", "--force"])
    assert out.read_bytes() == b"keep"


# ------------------------------------------------------------------------ real processes


def lorakit_cmd() -> list[list[str]]:
    """``python -m lorakit.cli`` and, when installed beside this Python, the ``lorakit`` script."""
    cmds = [[sys.executable, "-m", "lorakit.cli"]]
    script = Path(sys.executable).parent / "lorakit"
    if script.is_file():
        cmds.append([str(script)])
    return cmds


def run(cmd: list[str], *args: str, debug: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LORAKIT_DEBUG"}
    if debug:
        env["LORAKIT_DEBUG"] = "1"
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("cmd", lorakit_cmd(), ids=lambda c: "script" if len(c) == 1 else "module")
def test_process_prints_one_line_and_exits_1(tmp_path, cmd):
    given, named, words = build("truncated", tmp_path)
    res = run(cmd, "inspect", str(given))
    assert res.returncode == 1, res
    assert_one_line(res.stderr, named, words)
    assert res.stdout == ""


def test_process_bad_inputs_in_one_run(tmp_path):
    """Several named cases through real processes (run side by side to keep the test short)."""
    names = ["lfs_pointer_peft", "nan_lora_b", "pickle", "peft_type_loha"]
    procs = []
    for name in names:
        case = tmp_path / name
        case.mkdir()
        given, named, words = build(name, case)
        env = {k: v for k, v in os.environ.items() if k != "LORAKIT_DEBUG"}
        procs.append((subprocess.Popen(
            [sys.executable, "-m", "lorakit.cli", "convert", str(given), "--to", "peft", "-o",
             str(case / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env), named, words, case))
    for proc, named, words, case in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, (out, err)
        assert_one_line(err, named, words)
        assert not (case / "out").exists()


def test_debug_shows_traceback(tmp_path):
    given, named, _ = build("nan_lora_b", tmp_path)
    res = run(lorakit_cmd()[0], "inspect", str(given), debug=True)
    assert res.returncode != 0
    assert "Traceback (most recent call last)" in res.stderr
    assert "lorakit.errors.NonFiniteError" in res.stderr and str(named) in res.stderr
    assert "lorakit: error:" not in res.stderr  # the traceback replaces the one-line form


def test_debug_in_process_reraises(tmp_path, monkeypatch):
    from lorakit.errors import LfsPointerError

    given, named, _ = build("lfs_pointer", tmp_path)
    monkeypatch.setenv("LORAKIT_DEBUG", "1")
    with pytest.raises(LfsPointerError) as info:
        main(["inspect", str(given)])
    assert str(named) in str(info.value)


def test_real_adapter_truncated_through_cli(tmp_path, capsys):
    from conftest import require_real

    src = require_real("sd15_kohyalike_timohavdk") / "new.safetensors"
    p = tmp_path / "new.safetensors"
    shutil.copyfile(src, p)
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    p.write_bytes(raw[:8 + n + 1000])  # the header is whole, the data is not
    code, _, err = run_main(capsys, "convert", str(p), "--to", "diffusers", "-o",
                            str(tmp_path / "out.safetensors"))
    assert code == 1
    assert_one_line(err, p, ["truncated", "key '"])
    assert not (tmp_path / "out.safetensors").exists()
