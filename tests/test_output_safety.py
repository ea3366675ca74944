"""Never lose a user's file (issue 13): one test (at least) per defect class.

``--force`` replaces only lorakit's files; kind changes are refused; batches check the whole plan;
reports follow the output rules; killed runs' temporaries are swept and never read; recipes bound
alias expansion; numbers are checked where they enter; and the smaller ones (modes, long names,
fp8, resume records, config types). The property test is tests/test_safety_property.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lorakit
from lorakit.cli import main
from lorakit.errors import ConfigMismatchError, RecipeError
from lorakit.outputs import TEMP_SUFFIX, new_temp, remove_stale, temp_affixes

KOHYA = "lora_unet_mid_block_attentions_0_proj_in"
PEFT_MOD = "base_model.model.model.layers.0.self_attn.q_proj"
ROOT = Path(__file__).resolve().parent.parent


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def write_kohya(path: Path, dtype: torch.dtype = torch.float32, alpha: float = 4.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"{KOHYA}.lora_down.weight": rand(4, 8, seed=1).to(dtype),
               f"{KOHYA}.lora_up.weight": rand(6, 4, seed=2).to(dtype),
               f"{KOHYA}.alpha": torch.tensor(alpha)}, str(path))
    return path


def write_peft(folder: Path, **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **config}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({f"{PEFT_MOD}.lora_A.weight": rand(4, 8, seed=3),
               f"{PEFT_MOD}.lora_B.weight": rand(8, 4, seed=4)},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def same_ranks(a: Path, b: Path) -> bool:
    """Both load, with the same ranks (module names differ across formats)."""
    return sorted(lorakit.load(a).ranks().values()) == sorted(lorakit.load(b).ranks().values())


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def one_line_error(code: int, err: str, *words: str) -> None:
    lines = [ln for ln in err.splitlines() if not ln.startswith("lorakit: note:")]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("lorakit: error:"), err
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


def hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (symlinks as their target text)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p)] = "link:" + os.readlink(p)
        elif p.is_file():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def user_folder(root: Path) -> Path:
    """A folder with the user's own files: notes, a sub-folder of data, a card of their own."""
    (root / "data").mkdir(parents=True)
    (root / "notes.txt").write_text("my notes")
    (root / "data" / "table.csv").write_text("a,b\n1,2\n")
    return root


# ----------------------------------------------------------------------------- 1. --force


def test_force_into_a_folder_keeps_the_users_files(tmp_path, capsys):
    src = write_kohya(tmp_path / "in.safetensors")
    out = user_folder(tmp_path / "out")
    (out / "README.md").write_text("# my own readme\n")
    mine = hashes(out)
    code, _, err = run_cli(capsys, "convert", src, "--to", "peft", "-o", out, "--force")
    assert code == 0, err
    after = hashes(out)
    for p, h in mine.items():  # every user file byte-identical, the README included
        assert after[p] == h, p
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert "kept" in err and "README.md" in err  # a README lorakit did not write is kept, said so
    assert same_ranks(out, src)
    # in a folder lorakit wrote, --force replaces its own card too (and says nothing)
    own = tmp_path / "own"
    run_cli(capsys, "convert", src, "--to", "peft", "-o", own)
    (own / "README.md").write_text((own / "README.md").read_text() + "edited\n")
    code, _, err = run_cli(capsys, "convert", src, "--to", "peft", "-o", own, "--force")
    assert code == 0 and "kept" not in err and "edited" not in (own / "README.md").read_text()


def test_force_replaces_the_other_spelling_of_peft_weights(tmp_path, capsys):
    src = write_peft(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    torch.save({"x": torch.zeros(1)}, out / "adapter_model.bin")  # an old .bin adapter
    (out / "keep.bin").write_bytes(b"user")
    code, _, err = run_cli(capsys, "convert", src, "--to", "peft", "-o", out, "--force")
    assert code == 0, err
    assert not (out / "adapter_model.bin").exists()  # two weights files would disagree
    assert (out / "keep.bin").read_bytes() == b"user"


def test_kohya_output_given_as_a_folder_replaces_only_its_weights_file(tmp_path, capsys):
    src = write_peft(tmp_path / "in")
    out = user_folder(tmp_path / "DIR")
    mine = hashes(out)
    code, _, err = run_cli(capsys, "convert", src, "--to", "kohya", "-o", out, "--force")
    assert code == 0, err
    assert out.is_dir() and (out / "lora.safetensors").is_file()
    assert all(hashes(out)[p] == h for p, h in mine.items())


@pytest.mark.parametrize("to,out_kind", [("kohya", "dir"), ("peft", "file"),
                                         ("diffusers", "file")])
def test_changing_the_kind_of_an_output_is_refused_even_with_force(tmp_path, capsys, to,
                                                                   out_kind):
    src = write_peft(tmp_path / "in")
    name = "x.safetensors" if to == "kohya" else "x"
    out = tmp_path / name
    if out_kind == "dir":
        user_folder(out)
    else:
        out.write_text("a file of mine")
    before = hashes(tmp_path)
    code, _, err = run_cli(capsys, "convert", src, "--to", to, "-o", out, "--force")
    one_line_error(code, err, str(out), "one kind by the other")
    assert hashes(tmp_path) == before


def test_names_used_aside_are_fresh_and_user_lookalikes_survive(tmp_path, capsys):
    src = write_kohya(tmp_path / "in.safetensors")
    out = tmp_path / "out"
    run_cli(capsys, "convert", src, "--to", "peft", "-o", out)
    old = user_folder(tmp_path / ".out.old")  # the name the old code moved outputs aside to
    look = tmp_path / ".out.abcdefgh.tmp"  # and one like its temporaries
    look.write_text("mine")
    prefix, suffix = temp_affixes(out)
    fake = tmp_path / f"{prefix}notrandom{suffix}"  # not the random part's shape
    fake.write_text("mine too")
    before = hashes(old) | {str(look): "x"}
    code, _, err = run_cli(capsys, "convert", src, "--to", "peft", "-o", out, "--force")
    assert code == 0, err
    assert hashes(old).items() <= before.items() and look.read_text() == "mine"
    assert fake.read_text() == "mine too" and "removed" not in err


def test_output_dot_with_force(tmp_path, capsys, monkeypatch):
    src = write_kohya(tmp_path / "src" / "in.safetensors")
    work = user_folder(tmp_path / "work")
    mine = hashes(work)
    monkeypatch.chdir(work)
    code, _, err = run_cli(capsys, "convert", src, "--to", "peft", "-o", ".", "--force")
    assert code == 0, err
    assert all(hashes(work)[p] == h for p, h in mine.items())
    assert same_ranks(work, src)
    monkeypatch.chdir(src.parent)  # the folder holding the input: refused
    before = hashes(src.parent)
    code, _, err = run_cli(capsys, "convert", src, "--to", "peft", "-o", ".", "--force")
    one_line_error(code, err, "input")
    assert hashes(src.parent) == before
    code, _, err = run_cli(capsys, "convert", src, "--to", "peft", "-o", "/", "--force")
    one_line_error(code, err)


# -------------------------------------------------------------------------- 2. batch plans


def test_batch_job_may_not_write_into_another_jobs_input(tmp_path, capsys):
    a = write_peft(tmp_path / "coll" / "a")
    inner = write_kohya(tmp_path / "x" / "a" / "b.safetensors")  # inside job A's output
    manifest = tmp_path / "jobs.txt"
    manifest.write_text(f"{a}\n{inner}\n")
    before = hashes(tmp_path)
    code, _, err = run_cli(capsys, "convert", manifest, "--to", "peft", "-o", tmp_path / "x",
                           "--force", "--quiet")
    one_line_error(code, err, str(tmp_path / "x" / "a"), str(inner), "cannot plan the batch")
    assert hashes(tmp_path) == before
    assert not (tmp_path / "x" / ".lorakit-batch").exists()


def test_batch_output_may_not_hold_the_manifest_or_a_peft_config(tmp_path, capsys):
    coll = tmp_path / "c"
    write_peft(coll / "a")
    w = write_peft(tmp_path / "w" / "b")  # the weights file given alone: its config is an input
    m = tmp_path / "m.txt"
    m.write_text(f"{coll / 'a'}\n{w / 'adapter_model.safetensors'}\n")
    for report in (m, w / "adapter_config.json", coll / "a" / "adapter_config.json"):
        before = hashes(tmp_path)
        code, _, err = run_cli(capsys, "convert", m, "--to", "peft", "-o", tmp_path / "o",
                               "--report", report, "--force", "--quiet")
        one_line_error(code, err, str(report), "input")
        assert hashes(tmp_path) == before


# ---------------------------------------------------------------------------- 3. reports


def test_batch_report_follows_the_output_rules(tmp_path, capsys):
    coll = tmp_path / "c"
    write_peft(coll / "a")
    write_peft(coll / "b")
    out, rep = tmp_path / "o", tmp_path / "rep.json"
    rep.write_text("my old report")
    code, _, err = run_cli(capsys, "convert", coll, "--to", "peft", "-o", out, "--report", rep,
                           "--quiet")
    one_line_error(code, err, str(rep), "--force")
    assert rep.read_text() == "my old report" and not out.exists()  # refused before any job
    code, _, err = run_cli(capsys, "convert", coll, "--to", "peft", "-o", out, "--report",
                           tmp_path / "missing" / "rep.json", "--quiet")
    one_line_error(code, err, "does not exist")
    assert not (tmp_path / "missing").exists()
    for bad in (out / "a" / "r.json", out / "a", out / ".lorakit-batch" / "r.json", tmp_path):
        code, _, err = run_cli(capsys, "convert", coll, "--to", "peft", "-o", out, "--report",
                               bad, "--force", "--quiet")
        one_line_error(code, err, str(bad))
    code, _, err = run_cli(capsys, "convert", coll, "--to", "peft", "-o", out, "--report", rep,
                           "--force", "--quiet")
    assert code == 0, err
    assert json.loads(rep.read_text())["counts"]["done"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("cmd", [["convert", "--to", "kohya"], ["resize", "--rank", "2"]])
def test_single_command_report_follows_the_output_rules(tmp_path, capsys, cmd):
    src = write_peft(tmp_path / "in")
    out = tmp_path / "out.safetensors" if cmd[0] == "convert" else tmp_path / "out"
    base = [cmd[0], src, *cmd[1:], "-o", out]
    for report, words in ((src / "adapter_config.json", ["input"]), (out, ["overlap"]),
                          (tmp_path / "no" / "r.json", ["does not exist"]), (tmp_path, [])):
        before = hashes(tmp_path)
        code, _, err = run_cli(capsys, *base, "--report", report, "--force")
        one_line_error(code, err, str(report), *words)
        assert hashes(tmp_path) == before
    rep = tmp_path / "r.json"
    rep.write_text("old")
    code, _, err = run_cli(capsys, *base, "--report", rep)
    one_line_error(code, err, "--force")
    assert rep.read_text() == "old" and not out.exists()
    code, _, err = run_cli(capsys, *base, "--report", rep, "--force")
    assert code == 0 and json.loads(rep.read_text())["source"] == str(src)


# ------------------------------------------------------------------ 4. killed runs, stale temps

_SLOW = textwrap.dedent("""
    import os, sys, time
    import lorakit.io as io
    def slow(fd, data):
        os.write(fd, bytes(data[:64]))
        print("WRITING", flush=True)
        time.sleep(120)
    io._write_all = slow
    from lorakit.cli import main
    main(sys.argv[1:])
""")


def _start_slow(tmp_path: Path, *args: str) -> subprocess.Popen:
    """``lorakit ARGS`` in a subprocess whose writes stall after 64 bytes (until killed)."""
    script = tmp_path / "slow.py"
    script.write_text(_SLOW)
    proc = subprocess.Popen([sys.executable, str(script), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp_path)
    line = proc.stdout.readline()  # blocks until the write has started
    assert "WRITING" in line, line + proc.stdout.read()
    return proc


@pytest.mark.parametrize("to,name", [("peft", "o"), ("kohya", "o.safetensors")])
def test_sigkill_leftovers_are_swept_by_the_next_write_which_says_so(tmp_path, capsys, to,
                                                                     name):
    src = write_peft(tmp_path / "in")
    out = tmp_path / name
    proc = _start_slow(tmp_path, "convert", src, "--to", to, "-o", out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    left = [p for p in tmp_path.iterdir() if p.name.endswith(TEMP_SUFFIX)]
    assert len(left) == 1 and not out.exists()
    # never read as an adapter: the folder still expands to its one real adapter
    from lorakit.sources import expand

    assert [s.spec for s in expand([str(tmp_path)]).sources] == [str(tmp_path / "in")]
    code, _, err = run_cli(capsys, "convert", src, "--to", to, "-o", out)
    assert code == 0, err
    assert "removed" in err and str(left[0]) in err
    assert not left[0].exists() and same_ranks(out, src)


def test_sigterm_cleans_up_like_ctrl_c(tmp_path):
    src = write_peft(tmp_path / "in")
    proc = _start_slow(tmp_path, "convert", src, "--to", "peft", "-o", tmp_path / "o")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 130
    assert "aborted" in proc.stdout.read()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "slow.py"]


def test_a_live_temporary_is_never_swept(tmp_path):
    out = tmp_path / "o.safetensors"
    live = new_temp(out, is_dir=False)  # locked, as during a write
    try:
        assert remove_stale(out) == [] and live.path.exists()
    finally:
        live.release()
    assert remove_stale(out) == [live.path] and not live.path.exists()


def test_concurrent_write_to_one_output(tmp_path, capsys):
    src = write_peft(tmp_path / "in")
    out = tmp_path / "o"
    proc = _start_slow(tmp_path, "convert", src, "--to", "peft", "-o", out)
    try:
        code, _, err = run_cli(capsys, "convert", src, "--to", "peft", "-o", out)
        assert code == 0 and "removed" not in err
        assert len([p for p in tmp_path.iterdir() if p.name.endswith(TEMP_SUFFIX)]) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert same_ranks(out, src)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(TEMP_SUFFIX)]


def test_killed_batch_staging_is_swept_and_said(tmp_path, capsys):
    coll = tmp_path / "c"
    write_peft(coll / "a")
    write_peft(coll / "b")
    out = tmp_path / "o"
    proc = _start_slow(tmp_path, "convert", coll, "--to", "peft", "-o", out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    staging = out / ".lorakit-batch" / "staging"
    assert any(staging.iterdir())
    code, _, err = run_cli(capsys, "convert", coll, "--to", "peft", "-o", out, "--quiet")
    assert code == 0 and "removed" in err and "staging" in err
    assert not staging.exists() and sorted(p.name for p in out.iterdir()) == \
        [".lorakit-batch", "a", "b"]


# --------------------------------------------------------------------------- 5. recipes

BOMB = "\n".join(["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
                 + [f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]"
                    for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
                 + ["steps:", "  - load: x", "    source: *i", ""])


def test_billion_laughs_recipe_is_refused_fast_naming_the_key(tmp_path, capsys):
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(BOMB)
    assert len(BOMB) < 600
    t0 = time.perf_counter()
    code, _, err = run_cli(capsys, "run", recipe, "--check")
    assert time.perf_counter() - t0 < 10  # a generous bound: the expansion is never built
    one_line_error(code, err, "field 'f'", "100,000")
    assert len(err) < 400


def test_recipe_messages_never_format_a_whole_value(tmp_path):
    from lorakit.compose.recipe import parse_recipe

    big = "[" + ", ".join(["[1, 2, 3, 4, 5, 6, 7, 8]"] * 2000) + "]"  # 18k nodes, no aliases
    text = f"steps:\n  - load: a\n    source: {big}\n  - save: s\n    input: a\n    output: o\n"
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, base_dir=tmp_path)
    assert len(str(e.value)) < 400 and "field 'source'" in str(e.value)
    long_name = "x" * 100_000
    with pytest.raises(RecipeError) as e:
        parse_recipe(f"steps:\n  - load: {long_name}\n    source: hf://a/b\n", base_dir=tmp_path)
    assert len(str(e.value)) < 400
    self_ref = "steps: &s\n  - load: a\n    source: *s\n"
    with pytest.raises(RecipeError, match="refers to itself"):
        parse_recipe(self_ref, base_dir=tmp_path)
    with pytest.raises(RecipeError, match="nested too deeply"):
        parse_recipe("steps: " + "[" * 3000 + "]" * 3000, base_dir=tmp_path)


@pytest.mark.parametrize("field,value", [("weights", "[.nan, 1]"), ("weights", "[1e308, 1]"),
                                         ("weights", '"nan,1"'), ("options", "{lam: .inf}"),
                                         ("options", "{density: .nan}"),
                                         ("options", "{sign: bogus}"), ("energy", ".nan")])
def test_recipe_numbers_are_checked_where_they_enter(tmp_path, field, value):
    from lorakit.compose.recipe import parse_recipe

    text = (f"steps:\n  - load: a\n    source: hf://o/a\n  - load: b\n    source: hf://o/b\n"
            f"  - merge: m\n    inputs: [a, b]\n    method: dare_ties\n    {field}: {value}\n"
            f"  - save: s\n    input: m\n    output: out\n")
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, base_dir=tmp_path)
    assert field in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------ 6. tracebacks


@pytest.mark.parametrize("config,words", [
    ({"lora_alpha": 1e308}, ["lora_alpha", "scale"]),
    ({"target_modules": "(q_proj"}, ["target_modules", "regex"]),
    ({"use_rslora": "yes"}, ["use_rslora", "true or false"]),
    ({"layers_to_transform": "abc"}, ["layers_to_transform"]),
    ({"r": "4"}, ["'r'"]), ({"lora_alpha": "8"}, ["lora_alpha"]),
    ({"alpha_pattern": {"q_proj": float("inf")}}, ["alpha_pattern"]),
    ({"rank_pattern": {"q_proj": 0}}, ["rank_pattern"]),
    ({"use_dora": 1}, ["use_dora"]), ({"lora_dropout": 7}, ["lora_dropout"]),
])
def test_bad_config_values_give_the_same_line_everywhere(tmp_path, capsys, config, words):
    src = write_peft(tmp_path / "in", **config)
    errs = []
    for cmd in (["inspect", src], ["resize", src, "-o", tmp_path / "r", "--rank", "2"],
                ["convert", src, "--to", "kohya", "-o", tmp_path / "k.safetensors"]):
        code, _, err = run_cli(capsys, *cmd)
        one_line_error(code, err, "adapter_config.json", *words)
        errs.append(err)
    assert len(set(errs)) == 1  # inspect and resize say the same thing
    with pytest.raises(ConfigMismatchError):
        lorakit.load(src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


@pytest.mark.parametrize("weights", ["nan,1", "1e308,1", "inf,1", "1,-1e7"])
def test_merge_weights_must_be_finite_and_bounded(tmp_path, capsys, weights):
    a, b = write_peft(tmp_path / "a"), write_peft(tmp_path / "b")
    code, _, err = run_cli(capsys, "merge", a, b, "--method", "linear", "--weights", weights,
                           "-o", tmp_path / "m")
    one_line_error(code, err, "weights")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("option", ["lam=.inf", "lam=.nan", "density=.nan", "rescale=.nan",
                                    "sign=bogus", "lam=1e308"])
def test_merge_option_values_are_typed(tmp_path, capsys, option):
    a, b = write_peft(tmp_path / "a"), write_peft(tmp_path / "b")
    method = "knots" if option.startswith("lam") else "dare_ties"
    code, _, err = run_cli(capsys, "merge", a, b, "--method", method, "--option", option,
                           "-o", tmp_path / "m")
    one_line_error(code, err, option.split("=")[0])


def test_kohya_alpha_beyond_the_scale_bound_is_named(tmp_path, capsys):
    src = write_kohya(tmp_path / "k.safetensors", alpha=1e30)
    code, _, err = run_cli(capsys, "resize", src, "-o", tmp_path / "r.safetensors", "--rank", "2")
    one_line_error(code, err, "scale", "1e+30", str(src))


# --------------------------------------------------------------------------- 7. smaller ones


def test_folder_modes(tmp_path, capsys):
    src = write_kohya(tmp_path / "in.safetensors")
    new = tmp_path / "new"
    run_cli(capsys, "convert", src, "--to", "peft", "-o", new)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(new.stat().st_mode) == 0o777 & ~mask  # 0755 under umask 022
    assert stat.S_IMODE((new / "adapter_config.json").stat().st_mode) == 0o666 & ~mask
    run_cli(capsys, "convert", src, "--to", "peft", "-o", new, "--force")
    assert stat.S_IMODE(new.stat().st_mode) == 0o777 & ~mask  # not 0700 after --force
    new.chmod(0o750)
    (new / "adapter_config.json").chmod(0o600)
    run_cli(capsys, "convert", src, "--to", "peft", "-o", new, "--force")
    assert stat.S_IMODE(new.stat().st_mode) == 0o750  # the user's folder keeps its mode
    assert stat.S_IMODE((new / "adapter_config.json").stat().st_mode) == 0o600  # and files


@pytest.mark.parametrize("length", [250, 255])
def test_long_output_names(tmp_path, capsys, length):
    src = write_kohya(tmp_path / "in.safetensors")
    for to, name in (("kohya", "k" * (length - 12) + ".safetensors"), ("peft", "p" * length)):
        out = tmp_path / name
        code, _, err = run_cli(capsys, "convert", src, "--to", to, "-o", out)
        assert code == 0, err
        assert same_ranks(out, src)
        assert all(len(p.name.encode()) <= 255 for p in tmp_path.iterdir())
    assert len(temp_affixes(tmp_path / ("é" * 127))[0].encode()) <= 80


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_tensors_are_read(tmp_path, capsys, dtype):
    src = write_kohya(tmp_path / "fp8.safetensors", dtype=dtype)
    a = lorakit.load(src)
    m = next(iter(a.modules.values()))
    assert m.down.dtype == torch.bfloat16  # every float8 value exactly
    down = rand(4, 8, seed=1).to(dtype).double()  # the stored values, decoded by torch itself
    up = rand(6, 4, seed=2).to(dtype).double()
    want = 1.0 * up.numpy() @ down.numpy()  # alpha 4 / rank 4
    got = (m.scale * m.up.double() @ m.down.double()).numpy()
    assert abs(got - want).max() == 0.0
    code, _, err = run_cli(capsys, "resize", src, "-o", tmp_path / "r.safetensors", "--rank", "2")
    assert code == 0, err
    code, text, err = run_cli(capsys, "inspect", src, "--json")
    assert code == 0 and "bfloat16" in text


def test_sub_byte_dtypes_are_refused_by_name(tmp_path, capsys):
    p = write_kohya(tmp_path / "f4.safetensors")
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    key = f"{KOHYA}.lora_down.weight"
    header[key]["dtype"] = "F4"
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    p.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n:])
    code, _, err = run_cli(capsys, "inspect", p)
    one_line_error(code, err, "F4", key)


def test_batch_resume_notices_a_changed_output_of_the_same_size(tmp_path, capsys):
    coll = tmp_path / "c"
    write_peft(coll / "a")
    out = tmp_path / "o"
    write_peft(coll / "b")
    assert run_cli(capsys, "convert", coll, "--to", "peft", "-o", out, "--quiet")[0] == 0
    cfg = out / "a" / "adapter_config.json"
    text = cfg.read_text()
    st = cfg.stat()
    changed = text.replace('"r": 4', '"r": 5')
    assert len(changed) == len(text)
    time.sleep(0.01)
    cfg.write_text(changed)
    assert cfg.stat().st_size == st.st_size
    code, _, err = run_cli(capsys, "convert", coll, "--to", "peft", "-o", out, "--quiet")
    one_line_error(code, err, "changed since the batch wrote it", "--force")
    assert cfg.read_text() == changed  # refused, not overwritten without --force
    (out / "b" / "notes.txt").write_text("mine")  # a user's file beside an output: still skipped
    code, out_json, err = run_cli(capsys, "convert", coll, "--to", "peft", "-o", out, "--force",
                                  "--json")
    assert code == 0, err
    statuses = {j["source"]: j["status"] for j in json.loads(out_json)["jobs"]}
    assert statuses == {str(coll / "a"): "done", str(coll / "b"): "skipped"}
    assert cfg.read_text() == text and (out / "b" / "notes.txt").read_text() == "mine"


def test_read_only_outputs_are_never_replaced(tmp_path, capsys):
    src = write_kohya(tmp_path / "in.safetensors")
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"protected")
    out.chmod(0o444)
    code, _, err = run_cli(capsys, "convert", src, "--to", "kohya", "-o", out, "--force")
    one_line_error(code, err, "read-only")
    assert out.read_bytes() == b"protected"


def test_symlinks_at_outputs(tmp_path, capsys):
    src = write_kohya(tmp_path / "in.safetensors")
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"user's file elsewhere")
    (tmp_path / "to_input.safetensors").symlink_to(src)
    (tmp_path / "to_other.safetensors").symlink_to(other)
    (tmp_path / "dangling.safetensors").symlink_to(tmp_path / "nowhere")
    (tmp_path / "to_folder").symlink_to(tmp_path, target_is_directory=True)
    before = hashes(tmp_path)
    for name in ("to_input.safetensors", "to_folder"):
        code, _, err = run_cli(capsys, "convert", src, "--to", "kohya", "-o", tmp_path / name,
                               "--force")
        one_line_error(code, err, "input")
    code, _, err = run_cli(capsys, "convert", src, "--to", "kohya", "-o",
                           tmp_path / "dangling.safetensors")
    one_line_error(code, err, "--force")
    assert hashes(tmp_path) == before
    code, _, err = run_cli(capsys, "convert", src, "--to", "kohya", "-o",
                           tmp_path / "to_other.safetensors", "--force")
    assert code == 0, err  # the link is replaced; the file it pointed to is never written
    assert other.read_bytes() == b"user's file elsewhere"
    assert not (tmp_path / "to_other.safetensors").is_symlink()


# ------------------------------------------------------------- beyond the list


def test_ctrl_c_mid_batch_stops_at_once_and_leaves_no_partial_output(tmp_path, capsys):
    coll = tmp_path / "c"
    for name in "abc":
        write_peft(coll / name)
    out = tmp_path / "o"
    script = tmp_path / "slow.py"
    script.write_text(_SLOW)
    proc = subprocess.Popen([sys.executable, str(script), "convert", str(coll), "--to", "peft",
                             "-o", str(out), "--jobs", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert "WRITING" in proc.stdout.readline()
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
    assert proc.wait(timeout=60) == 130  # not after the queued jobs
    assert "aborted" in proc.stdout.read()
    assert not [p for p in out.iterdir() if not p.name.startswith(".")]  # nothing half-written
    code, _, err = run_cli(capsys, "convert", coll, "--to", "peft", "-o", out, "--quiet")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [".lorakit-batch", "a", "b", "c"]
    assert not (out / ".lorakit-batch" / "staging").exists()


def test_devices_pipes_and_reserved_names_are_never_outputs(tmp_path, capsys):
    src = write_kohya(tmp_path / "in.safetensors")
    fifo = tmp_path / "f.safetensors"
    os.mkfifo(fifo)
    link = tmp_path / "null.safetensors"
    link.symlink_to("/dev/null")
    folder = tmp_path / "peft"
    folder.mkdir()
    os.mkfifo(folder / "adapter_config.json")
    for out, to in ((fifo, "kohya"), (link, "kohya"), (folder, "peft")):
        code, _, err = run_cli(capsys, "convert", src, "--to", to, "-o", out, "--force")
        one_line_error(code, err, "device, pipe or socket")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.readlink(link) == "/dev/null"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json"]
    code, _, err = run_cli(capsys, "convert", src, "--to", "kohya", "-o",
                           tmp_path / ".x.12345678.abcdefgh.lorakit.tmp")
    one_line_error(code, err, "temporaries")


def test_report_to_a_stream(tmp_path, capsys):
    """``--report`` on a pipe (as /dev/stdout on a terminal or in a shell pipe) is written as a
    stream, without --force, and the pipe is not replaced."""
    import threading

    src = write_kohya(tmp_path / "in.safetensors")
    fifo = tmp_path / "report.pipe"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    code, _, err = run_cli(capsys, "convert", src, "--to", "kohya", "-o",
                           tmp_path / "o.safetensors", "--report", fifo, "--quiet")
    reader.join(timeout=30)
    assert code == 0, err
    assert json.loads(got[0])["format"] == "kohya" and stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_non_utf8_names(tmp_path, capsys):
    raw = os.fsencode(tmp_path) + b"/in\xfe"
    src = Path(os.fsdecode(raw))
    write_peft(src)
    out = Path(os.fsdecode(os.fsencode(tmp_path) + b"/out\xff"))
    for cmd in (["convert", src, "--to", "peft", "-o", out],
                ["resize", src, "--rank", "2", "-o", str(out) + "r"],
                ["convert", src, "--to", "kohya", "-o", str(out) + ".safetensors"]):
        code, _, err = run_cli(capsys, *cmd)
        assert code == 0, err
    assert "\ufffd" in (out / "README.md").read_text()  # the card records the name, replaced
    assert same_ranks(out, src)


def test_hard_links_and_dotdot_do_not_hide_an_input(tmp_path, capsys):
    src = write_kohya(tmp_path / "a" / "in.safetensors")
    twin = tmp_path / "twin.safetensors"
    os.link(src, twin)
    before = hashes(tmp_path)
    for out in (twin, tmp_path / "b" / ".." / "a" / "in.safetensors", tmp_path / "a" / ".."):
        code, _, err = run_cli(capsys, "convert", src, "--to", "kohya", "-o", out, "--force")
        one_line_error(code, err, "input")
    assert hashes(tmp_path) == before


def test_staging_sweep_removes_only_lorakits_own_entries(tmp_path, capsys):
    coll = tmp_path / "c"
    write_peft(coll / "a")
    out = tmp_path / "o"
    staging = out / ".lorakit-batch" / "staging"
    staging.mkdir(parents=True)
    (staging / "mine.txt").write_text("a user file in a reserved folder")
    code, _, err = run_cli(capsys, "convert", coll / "a", coll / "a", "--to", "peft", "-o", out,
                           "--quiet")
    assert code == 0, err
    assert (staging / "mine.txt").read_text() == "a user file in a reserved folder"


def test_a_weights_file_is_not_put_beside_another_adapter(tmp_path, capsys):
    src = write_peft(tmp_path / "in")
    peft_out = tmp_path / "p"
    run_cli(capsys, "convert", src, "--to", "peft", "-o", peft_out)
    before = hashes(peft_out)
    for to in ("kohya", "diffusers"):  # DIR/lora.safetensors would hide behind the PEFT config
        code, _, err = run_cli(capsys, "convert", src, "--to", to, "-o", peft_out, "--force")
        one_line_error(code, err, "two adapters in one folder", "adapter_config.json")
    assert hashes(peft_out) == before
    k = tmp_path / "k"
    assert run_cli(capsys, "convert", src, "--to", "kohya", "-o", k)[0] == 0
    assert run_cli(capsys, "convert", src, "--to", "kohya", "-o", k, "--force")[0] == 0  # itself
    code, _, err = run_cli(capsys, "convert", src, "--to", "diffusers", "-o", k, "--force")
    one_line_error(code, err, "lora.safetensors")


def test_extract_output_may_not_lie_inside_a_checkpoint(tmp_path, capsys):
    for name in ("base", "tuned"):
        (tmp_path / name).mkdir()
        save_file({"model.layers.0.q_proj.weight": rand(8, 6, seed=len(name))},
                  str(tmp_path / name / "model.safetensors"))
    before = hashes(tmp_path)
    for out in (tmp_path / "base" / "lora", tmp_path / "tuned"):
        code, _, err = run_cli(capsys, "extract", "--base", tmp_path / "base", "--tuned",
                               tmp_path / "tuned", "-o", out, "--rank", "2", "--force")
        one_line_error(code, err, "input")
    assert hashes(tmp_path) == before


def test_recipe_paths_with_nul_are_named(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text('steps:\n  - load: a\n    source: "i\\0n"\n  - save: s\n    input: a\n'
                      '    output: "o\\0x"\n')
    code, _, err = run_cli(capsys, "run", recipe)
    one_line_error(code, err, "NUL", "field 'source'", "field 'output'")


def test_an_unexpected_exception_is_still_one_line(tmp_path, capsys, monkeypatch):
    src = write_kohya(tmp_path / "in.safetensors")

    def boom(*a, **k):
        raise RuntimeError("unexpected\nmulti-line")

    monkeypatch.setattr("lorakit.inspect.inspect_adapter", boom)
    code, _, err = run_cli(capsys, "inspect", src)
    one_line_error(code, err, "internal error", "RuntimeError", "LORAKIT_DEBUG=1")
    monkeypatch.setenv("LORAKIT_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(["inspect", str(src)])
