"""Recipe validation: every problem is reported at once, with its step and field, and nothing
runs (no output, no staging folder) when there is one."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from lorakit.cli import cli, main
from lorakit.compose import StepKind, load_recipe, parse_recipe, run_recipe
from lorakit.errors import InputNotFoundError, RecipeError
from tests.conftest import real_adapter


def _problems(text: str, base_dir: Path, **kw) -> list:
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, base_dir=base_dir, **kw)
    return e.value.problems


def _where(problems) -> list[tuple]:
    return [(p.step, p.field) for p in problems]


def test_errors_in_three_steps_are_reported_together_and_nothing_runs(tmp_path):
    a = real_adapter("distilbert_emotion_dayanidhi")
    b = real_adapter("distilbert_imdb_tashu")
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"""\
steps:
  - load: a
    source: {a}
  - load: b
    source: {b}
  - load: c
    source: missing_adapter_dir          # 1: no such folder (relative to the recipe)
  - merge: m
    inputs: [a, b]
    method: averaging                    # 2: unknown merge method
    extras: first
  - resize: small
    input: m
    sv_fro: 1.5                          # 3: bad rank-policy value
  - save: out
    input: small
    output: out/merged
""")
    res = CliRunner().invoke(cli, ["run", str(recipe)])
    assert res.exit_code != 0
    err = res.exception
    assert isinstance(err, RecipeError)
    assert _where(err.problems) == [("c", "source"), ("m", "method"), ("small", "sv_fro")]
    text = str(err)
    assert text.startswith(f"{recipe}: 3 problems in the recipe: (1) step 3 'c' (load), "
                           "field 'source': no such file or folder")
    assert "unknown merge method 'averaging'" in text and "sv_fro must be in (0, 1]" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # nothing written
    again = pickle.loads(pickle.dumps(err))  # e.g. from a batch worker process
    assert again.problems == err.problems and str(again) == text
    assert [p["field"] for p in err.to_dict()["problems"]] == ["source", "method", "sv_fro"]
    # the console entry point: one line, exit 1
    with pytest.raises(SystemExit) as e:
        main(["run", str(recipe)])
    assert e.value.code == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_structure_problems(tmp_path):
    text = """\
nmae: typo
steps:
  - load: a
    source: hf://org/repo
  - merj: b                      # unknown kind
    inputs: [a]
  - merge: c
    inputs: [a, later]           # defined later
    method: ties
    weights: [1, 2, 3]           # 3 weights for 2 inputs
    options: {density: 2, foo: 1}
    seed: -1
  - resize: d
    input: nowhere               # undefined
    rank: 4
    energy: 0.5                  # two policies
    colour: red
  - resize: later
    input: a
  - convert: e
    input: a
    to: onnx
  - save: a                      # duplicate name
    input: a
    output: x
  - save: f
    input: c
    output: out
    force: "yes"
  - push: g
    input: c                     # not a save step
    repo: not a repo
"""
    got = _problems(text, tmp_path)
    where = _where(got)
    assert (None, "nmae") in where
    assert (None, "merj") in where and got[where.index((None, "merj"))].index == 2
    assert ("c", "inputs") in where
    assert "defined later (step 5)" in got[where.index(("c", "inputs"))].message
    assert ("c", "weights") in where and ("c", "seed") in where
    assert ("c", "options.foo") in where  # unknown option: reported, values not checked then
    assert ("d", "input") in where and "no step named 'nowhere'" in \
        got[where.index(("d", "input"))].message
    assert ("d", "rank policy") in where and ("d", "colour") in where
    assert ("later", "rank policy") in where  # resize without a policy
    assert ("e", "to") in where
    assert ("a", None) in where and "already used by step 1" in \
        got[where.index(("a", None))].message
    assert ("f", "force") in where
    assert ("g", "input") in where and "needs a save step" in \
        got[where.index(("g", "input"))].message
    assert ("g", "repo") in where
    assert len(got) == 15, [str(p) for p in got]


def test_merge_option_values_and_policy_options_are_checked(tmp_path):
    text = """\
steps:
  - load: a
    source: hf://org/a
  - load: b
    source: hf://org/b
  - merge: m
    inputs: [a, b]
    method: ties
    options: {density: 2}
  - merge: one
    inputs: [a]
    method: ties                 # needs two inputs
  - merge: conv
    inputs: [a, b]
    method: svd
    conv_rank: 4                 # no policy for the other modules
  - resize: r
    input: m
    budget: 0                    # not a count or a fraction
  - squeeze: s
    input: m
    rank: 4
    method: best
  - extract: x
    base: no_base
    tuned: no_tuned
    rank: 2
  - save: out
    input: m
    output: out
"""
    got = _problems(text, tmp_path)
    assert _where(got) == [("m", "options.density"), ("one", "inputs"), ("conv", "conv_rank"),
                           ("r", "budget"), ("s", "method"), ("x", "base"), ("x", "tuned")]
    assert "density must be in (0, 1], got 2" in got[0].message


def test_yaml_problems_are_named(tmp_path):
    got = _problems("steps:\n  - load: a\n    source: x\n    source: y\n", tmp_path)
    assert "duplicate key 'source'" in got[0].message and "line 4" in got[0].message
    got = _problems("steps: [\n", tmp_path)
    assert got[0].message.startswith("not valid YAML: line")
    assert "mapping with a 'steps' list" in _problems("- load: a\n", tmp_path)[0].message
    assert _where(_problems("steps: []\n", tmp_path)) == [(None, "steps")]
    got = _problems("steps:\n  - load: a\n    source: hf://o/r\n", tmp_path)
    assert "writes nothing" in got[0].message
    got = _problems("steps:\n  - load: 3\n    source: hf://o/r\n  - load: a\n    source: x\n"
                    "    resize: y\n", tmp_path)
    assert "must be an identifier" in got[0].message and "a step has one kind" in got[1].message
    got = _problems("steps:\n  - pull: a\n    source: ./local\n  - load: b\n"
                    "    source: hf://no-repo\n", tmp_path)
    assert _where(got)[:2] == [("a", "source"), ("b", "source")]


def test_outputs_checked_before_running(tmp_path):
    src = real_adapter("distilbert_notask_vinil")
    (tmp_path / "exists").mkdir()
    text = f"""\
steps:
  - load: a
    source: {src}
  - save: s1
    input: a
    output: exists
  - save: s2
    input: a
    output: dup
  - save: s3
    input: a
    output: dup
  - save: s4
    input: a
    output: {src}/inner
"""
    got = _problems(text, tmp_path)
    assert _where(got) == [("s1", "output"), ("s3", "output"), ("s4", "output")]
    assert "already exists" in got[0].message and "also written by step 3" in got[1].message
    assert "would write into the input of step 1" in got[2].message
    # with force the existing output is no problem (the others remain)
    assert _where(_problems(text, tmp_path, force=True)) == [("s3", "output"), ("s4", "output")]


def test_valid_recipe_parses_with_relative_paths_and_check_runs_nothing(tmp_path):
    src = real_adapter("distilbert_notask_vinil")
    (tmp_path / "sub").mkdir()
    link = tmp_path / "sub" / "adapter"
    link.symlink_to(src)
    recipe = tmp_path / "sub" / "r.yaml"
    recipe.write_text(yaml.safe_dump({"steps": [
        {"load": "a", "source": "adapter"},
        {"resize": "r", "input": "a", "energy": 0.5},
        {"save": "s", "input": "r", "output": "../out"}]}, sort_keys=False))
    parsed = load_recipe(recipe)
    assert [s.kind for s in parsed.steps] == [StepKind.LOAD, StepKind.RESIZE, StepKind.SAVE]
    assert parsed.step("a").path == link and parsed.step("s").path == tmp_path / "sub" / "../out"
    assert parsed.step("r").policy.kind.value == "energy"
    res = CliRunner().invoke(cli, ["run", str(recipe), "--check", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["valid"] and [s["kind"] for s in info["steps"]] == ["load", "resize", "save"]
    assert not (tmp_path / "out").exists()
    run_recipe(parsed)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_missing_recipe_file(tmp_path):
    with pytest.raises(InputNotFoundError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")


def test_unreadable_inputs_and_wrong_formats_are_found_before_running(tmp_path):
    (tmp_path / "pointer.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1234\n")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    src = real_adapter("distilbert_notask_vinil")
    text = f"""\
steps:
  - load: p
    source: pointer.safetensors
  - load: c
    source: cut.safetensors
  - load: k
    source: {src}
    format: kohya
  - save: s
    input: k
    output: out
"""
    got = _problems(text, tmp_path)
    assert _where(got) == [("p", "source"), ("c", "source"), ("k", "format")]
    assert "Git LFS pointer" in got[0].message
    assert "is a peft adapter, not kohya" in got[2].message
    assert not (tmp_path / "out").exists()
