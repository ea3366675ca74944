"""A recipe writes the same bytes as the equivalent CLI commands run one by one (real DistilBERT
adapters of ../shared/real_adapters); outputs are all-or-nothing; pull/push call the Hub module.

What "the same bytes" means (the decision documented in lorakit/compose/steps.py): PEFT output:
``adapter_model.safetensors`` and ``adapter_config.json`` are byte-identical and ``README.md`` (the
model card) records the recipe instead of the last command. diffusers/kohya output: the tensor
data and every header entry are byte-identical except ``lorakit.provenance``, which records the
recipe in the file itself.
"""

from __future__ import annotations

import json
import struct
import types
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

import lorakit
from lorakit.cli import cli, main
from lorakit.compose import load_recipe, run_recipe
from lorakit.errors import IncompatibleAdaptersError
from tests.conftest import real_adapter

TRIO = ["distilbert_emotion_dayanidhi", "distilbert_imdb_tashu", "distilbert_notask_vinil"]


def _cli(*args: str) -> None:
    res = CliRunner().invoke(cli, [*args, "--quiet"])
    assert res.exit_code == 0, (res.output, res.exception)


def _split_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(tmp_path: Path, steps: list[dict], name: str = "recipe.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump({"name": "test", "steps": steps}, sort_keys=False))
    return p


def _loads(srcs: list[str]) -> list[dict]:
    return [{"load": f"in{i}", "source": s} for i, s in enumerate(srcs)]


CHAINS = {
    # merge (ties, seeded dense path) -> resize (energy) -> convert diffusers -> save file
    "ties-energy-diffusers": (
        {"method": "ties", "weights": [1, 0.5, -0.3], "options": {"density": 0.5},
         "extras": "first"},
        ["--method", "ties", "--weights", "1,0.5,-0.3", "--option", "density=0.5",
         "--extras", "first"],
        {"energy": 0.9}, ["--energy", "0.9"], "diffusers", "c.safetensors"),
    # merge (svd with a rank policy) -> resize (sv_fro) -> convert peft -> save folder
    "svd-svfro-peft": (
        {"method": "svd", "rank": 12, "extras": "first"},
        ["--method", "svd", "--rank", "12", "--extras", "first"],
        {"sv_fro": 0.95}, ["--sv-fro", "0.95"], "peft", "c"),
    # merge (exact linear, heads dropped) -> resize (fixed) -> convert kohya -> save file
    "linear-rank-kohya": (
        {"method": "linear", "weights": "1,1,-0.5", "extras": "drop"},
        ["--method", "linear", "--weights", "1,1,-0.5", "--extras", "drop"],
        {"rank": 4}, ["--rank", "4"], "kohya", "c.safetensors"),
}


@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_recipe_equals_cli_commands_one_by_one(chain, tmp_path):
    merge_fields, merge_args, policy, policy_args, to, out_name = CHAINS[chain]
    srcs = [str(real_adapter(n)) for n in TRIO]
    cli_dir = tmp_path / "cli"
    _cli("merge", *srcs, *merge_args, "-o", str(cli_dir / "m"))
    _cli("resize", str(cli_dir / "m"), *policy_args, "-o", str(cli_dir / "r"))
    _cli("convert", str(cli_dir / "r"), "--to", to, "-o", str(cli_dir / out_name))

    steps = _loads(srcs) + [
        {"merge": "merged", "inputs": ["in0", "in1", "in2"], **merge_fields},
        {"resize": "small", "input": "merged", **policy},
        {"convert": "converted", "input": "small", "to": to},
        {"save": "out", "input": "converted", "output": f"rec/{out_name}"},
    ]
    recipe = _write(tmp_path, steps)
    res = CliRunner().invoke(cli, ["run", str(recipe), "--json"])
    assert res.exit_code == 0, (res.output, res.exception)
    info = json.loads(res.output)
    assert info["outputs"] == {"out": str(tmp_path / "rec" / out_name)}
    got, want = tmp_path / "rec" / out_name, cli_dir / out_name

    if to == "peft":
        for f in ("adapter_model.safetensors", "adapter_config.json"):
            assert (got / f).read_bytes() == (want / f).read_bytes(), f
        card = (got / "README.md").read_text()
        assert "## Recipe" in card and recipe.read_text().rstrip() in card
        assert f"- command: `lorakit run {recipe}`" in card
        for s in srcs:
            assert f"- source: `{s}`" in card
        return
    head_got, data_got = _split_safetensors(got)
    head_want, data_want = _split_safetensors(want)
    assert data_got == data_want  # every tensor byte
    meta_got, meta_want = head_got.pop("__metadata__"), head_want.pop("__metadata__")
    assert head_got == head_want  # names, dtypes, shapes, offsets
    prov = json.loads(meta_got.pop("lorakit.provenance"))
    meta_want.pop("lorakit.provenance")
    assert meta_got == meta_want
    assert prov["recipe"] == recipe.read_text() and prov["recipe_step"] == "out"
    assert prov["sources"] == srcs
    assert lorakit.load(got).ranks() == lorakit.load(want).ranks()


def test_squeeze_and_extract_steps_equal_their_commands(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.q.weight": torch.randn(24, 16, generator=g) for i in range(2)}
    tuned = {k: v + 0.1 * torch.randn(24, 3, generator=g) @ torch.randn(3, 16, generator=g)
             for k, v in base.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    src = str(real_adapter("distilbert_imdb_tashu"))
    _cli("squeeze", src, "--method", "randomized", "--seed", "3", "--rank", "4",
         "-o", str(tmp_path / "cli_sq"))
    _cli("extract", "--base", str(tmp_path / "base.safetensors"), "--tuned",
         str(tmp_path / "tuned.safetensors"), "--rank", "3", "--seed", "1",
         "-o", str(tmp_path / "cli_ex"))
    recipe = _write(tmp_path, [
        {"load": "a", "source": src},
        {"squeeze": "sq", "input": "a", "method": "randomized", "seed": 3, "rank": 4},
        {"save": "sq_out", "input": "sq", "output": "rec_sq"},
        {"extract": "ex", "base": "base.safetensors", "tuned": "tuned.safetensors", "rank": 3,
         "seed": 1},  # relative to the recipe's folder
        {"save": "ex_out", "input": "ex", "output": "rec_ex"},
    ])
    result = run_recipe(recipe)
    assert result.outputs == {"sq_out": tmp_path / "rec_sq", "ex_out": tmp_path / "rec_ex"}
    for name in ("sq", "ex"):
        for f in ("adapter_model.safetensors", "adapter_config.json"):
            assert (tmp_path / f"rec_{name}" / f).read_bytes() == \
                (tmp_path / f"cli_{name}" / f).read_bytes(), (name, f)


def test_failure_midway_leaves_no_output(tmp_path):
    # the first save succeeds, then the merge refuses the adapters' different heads: the run
    # fails and neither output (nor a staging folder) remains
    srcs = [str(real_adapter(n)) for n in TRIO[:2]]
    recipe = _write(tmp_path, _loads(srcs) + [
        {"resize": "small", "input": "in0", "rank": 2},
        {"save": "first", "input": "small", "output": "out/first"},
        {"merge": "m", "inputs": ["in0", "in1"], "method": "linear"},  # extras: error
        {"save": "second", "input": "m", "output": "out/second"},
    ])
    with pytest.raises(IncompatibleAdaptersError):
        run_recipe(recipe)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]
    res = CliRunner().invoke(cli, ["run", str(recipe)])
    assert res.exit_code != 0 and not (tmp_path / "out").exists()


def test_outputs_need_force_and_force_replaces(tmp_path, capsys):
    src = str(real_adapter("distilbert_notask_vinil"))
    recipe = _write(tmp_path, [{"load": "a", "source": src},
                               {"resize": "r", "input": "a", "rank": 2},
                               {"save": "s", "input": "r", "output": "o"}])
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "old.txt").write_text("x")
    with pytest.raises(SystemExit) as e:
        main(["run", str(recipe)])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "field 'output'" in err and "--force" in err
    assert (tmp_path / "o" / "old.txt").exists()
    main(["run", str(recipe), "--force", "--quiet"])
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == \
        ["README.md", "adapter_config.json", "adapter_model.safetensors", "old.txt"]
    assert (tmp_path / "o" / "old.txt").read_text() == "x"  # --force replaces lorakit's files only
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert lorakit.load(tmp_path / "o").ranks() == {k: 2 for k in lorakit.load(src).modules}


@pytest.fixture
def hub(monkeypatch):
    """The real lorakit.hub with ``resolve`` answering from a local folder (the Hub cache itself
    is tested in the Hub's own tests) and ``HfApi`` replaced at the Hub module's call site, so
    nothing touches the network; records what the recipe asked for."""
    import huggingface_hub

    import lorakit.hub

    calls: dict[str, list] = {"resolve": [], "api": []}
    local = real_adapter("distilbert_notask_vinil")

    def resolve(source: str) -> Path:
        calls["resolve"].append(source)
        return local

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls["api"].append(("create_repo", repo_id, kw))

        def create_branch(self, repo_id, **kw):
            calls["api"].append(("create_branch", repo_id, kw))

        def create_commit(self, repo_id, operations, **kw):
            files = {op.path_in_repo: op.path_or_fileobj for op in operations}
            calls["api"].append(("create_commit", repo_id, {**kw, "files": files}))
            return types.SimpleNamespace(commit_url=f"https://hf.co/{repo_id}/commit/1")

    monkeypatch.setattr(lorakit.hub, "resolve", resolve)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return calls


def test_pull_and_push_steps_call_the_hub(hub, tmp_path):
    recipe = _write(tmp_path, [
        {"pull": "a", "source": "hf://vinil/distilbert-lora@v1/adapter"},
        {"resize": "r", "input": "a", "rank": 4},
        {"save": "peft", "input": "r", "output": "out_peft"},
        {"push": "up", "input": "peft", "repo": "me/small", "revision": "dev",
         "private": True},
        {"convert": "d", "input": "r", "to": "diffusers"},
        {"save": "diff", "input": "d", "output": "out.safetensors"},
        {"push": "up2", "input": "diff", "repo": "me/small-diffusers", "dry_run": True},
    ])
    result = run_recipe(recipe)
    assert hub["resolve"] == ["hf://vinil/distilbert-lora@v1/adapter"]
    kinds = [c[0] for c in hub["api"]]
    assert kinds == ["create_repo", "create_branch", "create_commit"]  # the dry run uploads nothing
    _, repo, info = hub["api"][2]
    assert repo == "me/small" and info["revision"] == "dev"
    assert hub["api"][0][2]["private"] is True
    assert sorted(info["files"]) == ["README.md", "adapter_config.json",
                                     "adapter_model.safetensors"]
    card = info["files"]["README.md"].decode()
    assert "library_name: peft" in card and "## Recipe" in card
    assert "hf://vinil/distilbert-lora@v1/adapter" in card
    dry = result.pushed["up2"]
    assert dry.dry_run and [f for f, _ in dry.files] == ["out.safetensors", "README.md"]
    assert "## Recipe" in dry.card and "library_name: peft" not in dry.card
    assert result.outputs == {"peft": tmp_path / "out_peft",
                              "diff": tmp_path / "out.safetensors"}


def test_load_passes_hf_sources_to_the_api(monkeypatch, tmp_path):
    seen = []
    real_load = lorakit.api.load

    def load(source, format=None):
        seen.append(source)
        return real_load(real_adapter("distilbert_notask_vinil"), format)

    monkeypatch.setattr(lorakit.api, "load", load)
    recipe = _write(tmp_path, [{"load": "a", "source": "hf://org/repo@main"},
                               {"save": "s", "input": "a", "output": "o"}])
    load_recipe(recipe)  # no file check for hf:// sources
    run_recipe(recipe)
    assert seen == ["hf://org/repo@main"]
    assert "- source: `hf://org/repo@main`" in (tmp_path / "o" / "README.md").read_text()


def test_compose_step_equals_the_units_api(tmp_path):
    from lorakit.compose import assemble, combine, select, split

    a_src, b_src = real_adapter("gpt2_tigrinya"), real_adapter("gpt2_r4_jhess")
    recipe = _write(tmp_path, [
        {"load": "a", "source": str(a_src)},
        {"load": "b", "source": str(b_src)},
        {"compose": "mix", "units": [{"input": "a", "top": 4},
                                     {"input": "b", "module_regex": r"\.attn\.c_attn$",
                                      "weight": 0.5}]},
        {"save": "out", "input": "mix", "output": "rec"},
    ])
    run_recipe(recipe)
    a, b = lorakit.load(a_src), lorakit.load(b_src)
    api = assemble(combine(select(split(a, source=0), top=4),
                           select(split(b, 0.5, source=1), module_regex=r"\.attn\.c_attn$")),
                   like=a)
    lorakit.save(api, tmp_path / "api")
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "rec" / f).read_bytes() == (tmp_path / "api" / f).read_bytes(), f
    assert lorakit.load(tmp_path / "rec").ranks()["transformer.h.0.attn.c_attn"] == 8


def test_compose_step_fields_are_validated(tmp_path):
    from lorakit.compose import parse_recipe
    from lorakit.errors import RecipeError

    text = yaml.safe_dump({"steps": [
        {"load": "a", "source": "hf://o/a"},
        {"compose": "mix", "units": [{"input": "a", "top": 0, "colour": 1},
                                     {"module_regex": "("}, {"input": "later"}]},
        {"load": "later", "source": "hf://o/b"},
        {"save": "s", "input": "mix", "output": "o"}]}, sort_keys=False)
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, base_dir=tmp_path)
    where = [(p.step, p.field) for p in e.value.problems]
    assert where == [("mix", "units[2].input"), ("mix", "units[0].top"),
                     ("mix", "units[0].colour"), ("mix", "units[1].module_regex"),
                     ("mix", "units[1].input")]


def test_unwritable_output_is_named_and_earlier_outputs_are_not_kept(tmp_path):
    from lorakit.errors import OutputWriteError

    (tmp_path / "a_file").write_text("not a folder")
    recipe = _write(tmp_path, [
        {"load": "a", "source": str(real_adapter("distilbert_notask_vinil"))},
        {"save": "ok", "input": "a", "output": "fine"},
        {"save": "bad", "input": "a", "output": "a_file/inside"},
    ])
    with pytest.raises(OutputWriteError) as e:
        run_recipe(recipe)
    assert e.value.path == str(tmp_path / "a_file" / "inside")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "recipe.yaml"]
