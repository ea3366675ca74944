"""The whole Trans-LoRA pipeline end to end on two tiny, different models (see conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lorakit.cli import cli
from lorakit.transfer.records import read_examples

TRANSFER_ARGS = ["--synthetic", "16", "--max-input-tokens", "8", "--max-answer-tokens", "4",
                 "--rank", "4", "--target-modules", "c_attn", "--steps", "8", "--lr", "5e-3",
                 "--batch-size", "4", "--seed", "1", "--quiet"]


def invoke(args: list[str]):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def disc(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("disc") / "disc_add"
    invoke(["transfer", "--source-model", tiny["source"], "--train-discriminator", tiny["real"],
            "--discriminator", out, "--task", "add", "--discriminator-only", "--disc-steps", "6",
            "--synthetic", "12", "--max-input-tokens", "8", "--quiet"])
    return out


@pytest.fixture(scope="module")
def run(tiny, disc, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("transfer") / "add_on_target"
    result = invoke(["transfer", "--source-model", tiny["source"], "--adapter", tiny["adapter"],
                     "--target-model", tiny["target"], "--seeds", tiny["seeds"], "-o", out,
                     "--discriminator", disc, "--task", "add", "--keep-top", "0.5",
                     "--baseline", "seeds", "--baseline", "unfiltered", "--baseline", "copy",
                     "--json", *TRANSFER_ARGS])
    return {"out": out, "work": Path(str(out) + ".work"), "json": json.loads(result.stdout)}


def test_discriminator_artifact(disc):
    meta = json.loads((disc / "discriminator.json").read_text())
    assert meta["format"] == "lorakit-discriminator" and meta["task"] == "add"
    assert meta["real_count"] == 40 and meta["synthetic_count"] == 12
    assert 0.0 <= meta["holdout_accuracy"] <= 1.0
    assert (disc / "adapter" / "adapter_config.json").is_file()
    assert len(read_examples(disc / "negatives.jsonl", need_output=False)) == 12
    cfg = json.loads((disc / "adapter" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and "score" in (cfg["modules_to_save"] or [])


def test_synthetic_stage(run, tiny):
    synthetic = read_examples(run["work"] / "synthetic.jsonl", need_output=False)
    seeds = {e.input for e in read_examples(tiny["seeds"])[:5]}
    keys = [" ".join(e.input.split()).casefold() for e in synthetic]
    assert 0 < len(synthetic) <= 16
    assert len(set(keys)) == len(keys)  # deduplicated
    assert all(k and "\n" not in k for k in keys) and not seeds & {e.input for e in synthetic}
    assert run["json"]["counts"]["synthetic_before_filter"] == len(synthetic)


def test_filter_keeps_what_the_discriminator_accepts(run, disc):
    from lorakit.transfer.discriminator import Discriminator

    synthetic = read_examples(run["work"] / "synthetic.jsonl", need_output=False)
    filtered = read_examples(run["work"] / "filtered.jsonl", need_output=False)
    # score again with the saved discriminator, independently of the pipeline
    scores = Discriminator.load(disc, task="add").score([e.input for e in synthetic])
    n_keep = round(len(synthetic) * 0.5)
    ranked = sorted(range(len(synthetic)), key=lambda i: -scores[i])
    expected = [synthetic[i].input for i in sorted(ranked[:n_keep])]
    assert [e.input for e in filtered] == expected
    assert len(filtered) < len(synthetic)  # the rejected half is gone
    worst_kept = min(e.score for e in filtered)
    rejected = [s for e, s in zip(synthetic, scores, strict=True)
                if e.input not in set(expected)]
    assert all(s <= worst_kept + 1e-6 for s in rejected)
    for e in filtered:
        assert e.score == pytest.approx(scores[[s.input for s in synthetic].index(e.input)],
                                        abs=1e-5)
    assert run["json"]["counts"]["synthetic_after_filter"] == len(filtered)


def test_labels_are_the_teachers_greedy_answers(run, tiny):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    labelled = read_examples(run["work"] / "labelled.jsonl")
    filtered = read_examples(run["work"] / "filtered.jsonl", need_output=False)
    assert [e.input for e in labelled] == [e.input for e in filtered]
    tok = AutoTokenizer.from_pretrained(tiny["source"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["source"]),
                                      tiny["adapter"]).eval()
    for ex in labelled[:3]:  # one at a time, no padding: an independent greedy decode
        ids = tok(ex.input + "\n", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=4, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        assert ex.output == text.split("\n")[0].strip()
    unfiltered = read_examples(run["work"] / "labelled_unfiltered.jsonl")
    assert len(unfiltered) == run["json"]["counts"]["synthetic_before_filter"]


def test_adapter_rank_modules_and_card(run, tiny):
    import lorakit

    out = run["out"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["target_modules"] == ["c_attn"]
    assert cfg["base_model_name_or_path"] == str(tiny["target"])
    adapter = lorakit.load(out)
    assert set(adapter.ranks().values()) == {4}
    assert sorted(adapter.modules) == [f"transformer.h.{i}.attn.c_attn" for i in range(2)]
    m = adapter.modules["transformer.h.0.attn.c_attn"]
    assert tuple(m.down.shape) == (4, 32) and tuple(m.up.shape) == (96, 4)  # Conv1D c_attn
    assert m.up.abs().sum() > 0  # trained away from PEFT's zero init of B
    record = json.loads((out / "transfer.json").read_text())
    c = run["json"]["counts"]
    assert record["seeds"] == 5 and record["task"] == "add"
    assert record["synthetic_before_filter"] == c["synthetic_before_filter"]
    assert record["synthetic_after_filter"] == c["synthetic_after_filter"]
    assert record["training"]["rank"] == 4 and record["training"]["steps"] == 8
    assert len(record["losses"]) == 8 and all(0 < x < 20 for x in record["losses"])
    card = (out / "README.md").read_text()
    for text in (str(tiny["source"]), str(tiny["target"]), "| seed examples | 5 |",
                 f"| synthetic inputs before filtering | {c['synthetic_before_filter']} |",
                 f"| synthetic inputs after filtering | {c['synthetic_after_filter']} |",
                 "| training rank | 4 |", "| training lr | 0.005 |"):
        assert text in card


def test_transferred_adapter_loads_in_peft_and_matches_lorakit(run, tiny):
    """PEFT applies the written adapter; its effect equals lorakit's scale * B @ A."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import lorakit

    base = AutoModelForCausalLM.from_pretrained(tiny["target"]).eval()
    w0 = base.transformer.h[0].attn.c_attn.weight.detach().clone()  # Conv1D: (in, out)
    merged = PeftModel.from_pretrained(base, run["out"]).merge_and_unload()
    w1 = merged.transformer.h[0].attn.c_attn.weight.detach()
    m = lorakit.load(run["out"]).modules["transformer.h.0.attn.c_attn"]
    expected = m.scale * (m.up.double() @ m.down.double())  # (out, in)
    torch.testing.assert_close((w1 - w0).double().T, expected, atol=1e-6, rtol=1e-4)


def test_baselines(run, tiny):
    b = run["json"]["baselines"]
    seeds = json.loads((Path(b["seeds"]) / "transfer.json").read_text())
    assert seeds["kind"] == "seeds" and seeds["train_examples"] == 5
    unf = json.loads((Path(b["unfiltered"]) / "transfer.json").read_text())
    assert unf["kind"] == "unfiltered"
    # matched data budget (default): as many unfiltered inputs as the filter kept, the first ones
    counts = run["json"]["counts"]
    assert counts["synthetic_after_filter"] < counts["synthetic_before_filter"]
    assert unf["train_examples"] == counts["synthetic_after_filter"]
    assert unf["synthetic_after_filter"] == counts["synthetic_after_filter"]
    # Llama (source) and GPT-2 (target) shapes differ: the copy baseline says why it was skipped
    assert b["copy"].startswith("skipped: module 'model.layers.0.self_attn.q_proj'")


def test_copy_baseline_when_shapes_match(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from lorakit.transfer.pipeline import copy_shapes_match

    same = AutoModelForCausalLM.from_pretrained(tiny["source"])
    assert copy_shapes_match(tiny["adapter"], same) is None
    other = AutoModelForCausalLM.from_pretrained(tiny["target"])
    assert "not in the target model" in copy_shapes_match(tiny["adapter"], other)


def test_resume_skips_finished_stages(run, tiny, disc):
    args = ["transfer", "--source-model", tiny["source"], "--adapter", tiny["adapter"],
            "--target-model", tiny["target"], "--seeds", tiny["seeds"], "-o", run["out"],
            "--discriminator", disc, "--task", "add", "--force", "--json", *TRANSFER_ARGS]
    before = (run["work"] / "filtered.jsonl").read_bytes()
    again = json.loads(invoke([*args, "--keep-top", "0.5"]).stdout)
    assert again["stages"]["synthetic"] == "resumed" and again["stages"]["filtered"] == "resumed"
    assert again["stages"]["labelled"] == "resumed" and again["stages"]["train"] == "ran"
    assert (run["work"] / "filtered.jsonl").read_bytes() == before
    # a different filter reruns filtering and what follows, but not synthesis
    changed = json.loads(invoke([*args, "--filter-threshold", "0.0"]).stdout)
    assert changed["stages"]["synthetic"] == "resumed"
    assert changed["stages"]["filtered"] == "ran" and changed["stages"]["labelled"] == "ran"
    assert changed["counts"]["synthetic_after_filter"] == changed["counts"][
        "synthetic_before_filter"]  # every probability is >= 0


def test_unfiltered_baseline_size_rule():
    from types import SimpleNamespace

    from lorakit.transfer.pipeline import TransferOptions, UnfilteredSize, _unfiltered_data
    from lorakit.transfer.records import Example

    xs = [Example(str(i), str(i)) for i in range(10)]
    result = SimpleNamespace(counts={"synthetic_after_filter": 4})
    matched = SimpleNamespace(o=TransferOptions(), result=result)
    assert [e.input for e in _unfiltered_data(matched, xs)] == ["0", "1", "2", "3"]
    every = SimpleNamespace(o=TransferOptions(unfiltered_size=UnfilteredSize.ALL), result=result)
    assert _unfiltered_data(every, xs) == xs
