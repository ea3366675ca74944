"""The zoo's task data, scoring, training helpers and the quality benchmark's harness, on a tiny
Llama built from a config (no download)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from datetime import date

import pytest
import torch

from adapters_zoo.tasks import (
    TASK_NAMES,
    TASKS,
    Metric,
    Task,
    ZooDataError,
    clean_wikitext,
    exact_match,
    generate_answers,
    gensim_test_data,
    make_add,
    make_capital,
    make_date,
    make_reverse,
    passages,
    perplexity,
    read_capitals,
)
from adapters_zoo.train import TrainConfig, applied, peft_to_adapter, train_lora, wrap_lora

# -- data ------------------------------------------------------------------------------------


def test_generated_tasks_are_correct_disjoint_and_seeded():
    for make in (make_add, make_reverse, make_date):
        train, test = make()
        assert make() == (train, test)  # fixed seed: the same split every time
        assert not {x for x, _ in train} & {x for x, _ in test}
        assert len(set(x for x, _ in train + test)) == len(train) + len(test)
    for x, y in make_add()[0][:50]:
        a, b = x.split(" + ")
        assert int(y) == int(a) + int(b) and 100 <= int(a) <= 999
    for x, y in make_reverse()[0][:50]:
        assert y.split() == x.split()[::-1] and 3 <= len(x.split()) <= 5
    for x, y in make_date()[0][:50]:
        d = date.fromisoformat(x)
        assert y == f"{d.day} {d.strftime('%B')} {d.year}"


def test_capital_split_is_by_country():
    table = dict(read_capitals())
    train, test = make_capital()
    assert len(table) >= 150 and table["France"] == "Paris"
    assert not {c for c, _ in train} & {c for c, _ in test}
    assert sorted(train + test) == sorted(table.items())


def test_bad_capital_table_is_named(tmp_path):
    bad = tmp_path / "capitals.tsv"
    bad.write_text("France\tParis\nSpain Madrid\n")
    with pytest.raises(ZooDataError, match=r"capitals.tsv: line 2"):
        read_capitals(bad)


def test_lm_tasks_from_gensim_test_data():
    try:
        gensim_test_data()
    except ZooDataError as exc:
        pytest.skip(f"gensim test data absent: {exc}")
    for name in ("wiki", "news"):
        task = TASKS[name]
        assert task.metric is Metric.PERPLEXITY and not task.higher_is_better
        assert len(task.train) > 500 and len(task.test) >= 24
        assert not {y for _, y in task.train} & {y for _, y in task.test}
        assert all(len(y.split()) == 40 for _, y in task.test)
    assert set(TASKS) == set(TASK_NAMES) == {"add", "capital", "reverse", "date", "wiki", "news"}


def test_wikitext_cleaning_and_passages():
    text = "'''A''' {{cite|x={{y}}}} is [[b|c]].<ref>r</ref> {| t |} end"
    assert clean_wikitext(text) == "'''A'''  is [[b|c]].  end"
    assert passages("a b c d e", words=2) == ["a b", "c d"]


# -- scoring ---------------------------------------------------------------------------------


def test_exact_match_scores_the_greedy_answer(tiny):
    model, tok = tiny
    task = Task("t", Metric.EXACT_MATCH, [], [("ab", "x"), ("cd", "y")], "Q {x}:", 3)
    answers = generate_answers(task, model, tok, ["ab", "cd"])
    # an independent greedy decode, one prompt at a time, no padding
    for inp, got in zip(["ab", "cd"], answers, strict=True):
        ids = tok(task.prompt(inp), add_special_tokens=False, return_tensors="pt")["input_ids"]
        for _ in range(3):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            if int(nxt) in (tok.eos_token_id, tok.convert_tokens_to_ids("\n")):
                break
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        want = tok.decode(ids[0, len(task.prompt(inp)):]).split("\n")[0].strip()
        assert got == want
    labelled = [("ab", answers[0]), ("cd", answers[1] + "z")]
    assert exact_match(task, model, tok, labelled) == 0.5


def test_perplexity_matches_the_models_own_loss(tiny):
    model, tok = tiny
    text = "the cat sat on the mat"
    got = perplexity(model, tok, [("", text), ("", "on the mat")], batch_size=1)
    nll, n = 0.0, 0
    for t in (text, "on the mat"):
        ids = torch.tensor([[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss
        nll += float(loss) * (ids.shape[1] - 1)
        n += ids.shape[1] - 1
    assert got == pytest.approx(math.exp(nll / n), rel=1e-5)
    # padding in a batch changes nothing
    assert perplexity(model, tok, [("", text), ("", "on the mat")], batch_size=2) == \
        pytest.approx(got, rel=1e-5)


def test_normalised_score(quality):
    em = Task("e", Metric.EXACT_MATCH, [], [])
    ppl = Task("p", Metric.PERPLEXITY, [], [])
    assert quality.normalised(em, 0.1, 0.9, 0.5) == pytest.approx(0.5)
    assert quality.normalised(ppl, 40.0, 20.0, 40.0) == pytest.approx(0.0)
    assert quality.normalised(ppl, 40.0, 20.0, 20.0) == pytest.approx(1.0)
    assert quality.normalised(ppl, 40.0, 10.0, 20.0) == pytest.approx(0.5)  # log space
    assert math.isnan(quality.normalised(em, 0.3, 0.3, 0.5))


# -- training helpers ------------------------------------------------------------------------

# a tiny random model learns a fixed answer quickly (copying would need many more steps)
ECHO = Task("echo", Metric.EXACT_MATCH, [(c, "ok") for c in "abcdefghij"] * 4,
            [(c, "ok") for c in "klmnopqrst"], "say {x}:", 4)
LM = Task("lm", Metric.PERPLEXITY, [("", "abc abc abc abc")] * 8, [("", "abc abc abc")])
CFG = TrainConfig(steps=40, batch_size=8, lr=5e-2, rank=4, alpha=8, seed=3,
                  targets=("q_proj", "v_proj", "o_proj"), mlp_layers=(1,))


def test_training_learns_and_is_deterministic(tiny):
    model, tok = tiny
    base = ECHO.score(model, tok)
    run = train_lora(model, tok, ECHO, CFG)
    a1 = peft_to_adapter(run.model)
    run.model.unload()
    assert run.losses[-1] < run.losses[0] / 4
    with applied(model, a1):
        tuned = ECHO.score(model, tok)
    assert tuned > base and tuned >= 0.8
    assert {k.split(".")[-1] for k in a1.modules} == {"q_proj", "v_proj", "o_proj", "up_proj",
                                                     "down_proj"}
    assert not any(".layers.0.mlp" in k for k in a1.modules)
    run2 = train_lora(model, tok, ECHO, CFG)
    a2 = peft_to_adapter(run2.model)
    run2.model.unload()
    for k, m in a1.modules.items():  # same seed, same threads: the same bytes
        assert torch.equal(m.down, a2.modules[k].down) and torch.equal(m.up, a2.modules[k].up)


def test_applied_equals_peft_forward_and_restores(tiny):
    model, tok = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pm = wrap_lora(model, replace(CFG, steps=3))
    with torch.no_grad():  # make B nonzero so the update matters
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = torch.tensor([[1, 5, 9, 11, 4]])
    with torch.no_grad():
        want = pm(input_ids=ids).logits
    adapter = peft_to_adapter(pm)
    pm.unload()
    with applied(model, adapter), torch.no_grad():
        got = model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# -- the benchmark harness -------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained():
    """Two tiny adapters: echo (exact match) and lm (perplexity), on one tiny model (every test
    leaves its weights as it found them)."""
    from tests.zoo.conftest import char_tokenizer, tiny_llama

    tok = char_tokenizer()
    model = tiny_llama(len(tok))
    out = {}
    for task, cfg in ((ECHO, CFG), (LM, replace(CFG, steps=15, batch_size=4, mlp_layers=()))):
        run = train_lora(model, tok, task, cfg)
        out[task.name] = peft_to_adapter(run.model)
        run.model.unload()
    return model, tok, {"echo": ECHO, "lm": LM}, out


def test_merge_pass_and_reports(trained, quality, tmp_path):
    model, tok, tasks, adapters = trained
    limits = {"echo": 6, "lm": None}
    configs = [quality.MergeConfig("linear", "linear"), quality.MergeConfig("cat", "cat"),
               quality.MergeConfig("ties d=0.5", "ties", {"density": 0.5}),
               quality.MergeConfig("lego k=4", "lego", {"k": 4, "n_init": 2}),
               quality.MergeConfig("knots d=0.5", "knots", {"density": 0.5}),
               quality.MergeConfig("svd r2", "svd", rank=2)]
    res = quality.run_merges(model, tok, tasks, adapters, configs, limits, log=lambda s: None)
    rows = {r.label: r for r in res["rows"]}
    assert rows["base model"].norm == {"echo": 0.0, "lm": 0.0}
    assert rows["single adapter (own task)"].norm == {"echo": 1.0, "lm": 1.0}
    # cat and linear are the same function: the same scores
    assert rows["cat"].raw == pytest.approx(rows["linear"].raw, rel=1e-4)
    assert rows["svd r2"].note == "rank 2"
    for label in ("linear", "ties d=0.5", "lego k=4", "knots d=0.5"):
        assert set(rows[label].raw) == {"echo", "lm"} and not math.isnan(rows[label].mean)
    # the base model is untouched after all merges
    assert quality.score_tasks(model, tok, tasks, None, limits) == pytest.approx(res["base"])
    points = quality.run_compression(model, tok, tasks, adapters, res["base"], res["single"],
                                     [2], limits, ["echo"], {"echo": CFG}, recovery_steps=3,
                                     log=lambda s: None)
    routes = {(p.task, p.route) for p in points}
    assert routes == {("echo", "resize (exact)"), ("echo", "squeeze (randomized)"),
                      ("lm", "resize (exact)"), ("lm", "squeeze (randomized)"),
                      ("echo", "squeeze + 3 steps"), ("echo", "annealed in training"),
                      ("echo", "trained at rank")}
    assert all(p.rank == 2 for p in points)
    meta = {"quick": True, "model": "tiny", "threads": 1, "wall_s": 1.0,
            "test_sizes": {"echo": 6, "lm": 1}}
    outs = quality.write_reports(tmp_path, "q", tasks, res, points, meta)
    assert [o.name for o in outs] == ["q.md", "q.json", "q.png"]
    md = (tmp_path / "q.md").read_text()
    assert "| ties d=0.5 |" in md and "Compression" in md and "Best mean" in md
    data = json.loads((tmp_path / "q.json").read_text())
    assert [r["label"] for r in data["merge"]][:3] == ["base model", "single adapter (own task)",
                                                        "linear"]
    assert len(data["compression"]) == len(points)
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.json", "q.md", "q.png"]


def test_merge_error_is_reported_not_hidden(trained, quality):
    model, tok, tasks, adapters = trained
    bad = [quality.MergeConfig("ties bad", "ties", {"density": 1.5})]
    res = quality.run_merges(model, tok, tasks, adapters, bad, {"echo": 2, "lm": 1},
                             log=lambda s: None)
    row = res["rows"][-1]
    assert row.label == "ties bad" and not row.raw and "density must be in (0, 1]" in row.note
    assert "| ties bad | — | — | — | — | error: " in quality.markdown(tasks, res, [], {})
