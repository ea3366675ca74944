"""RegMean on a tiny Llama built from a config (offline): against a dense numpy RegMean written
here from the paper's formula, with activations taken by this test's own hooks."""

from __future__ import annotations

import json
import string

import numpy as np
import pytest
import torch

import lorakit
from lorakit.adapter import Adapter, LoraModule
from lorakit.errors import LorakitError
from lorakit.lowrank import RankPolicy

pytest.importorskip("transformers", reason="regmean needs the transfer extra")

CHARS = string.ascii_letters + string.digits + " :+=->.,"
KEYS = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.o_proj",
        "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
PROMPTS = [["12 + 7 =", "3 + 45 =", "100 + 1 ="],
           ["Capital of France:", "Capital of Peru:"],
           ["red blue => blue red", "a b c", "one two three four five six"]]


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>")


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = char_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    return model, tok


def _adapters(model, keys_per=(KEYS, KEYS[:4], KEYS), ranks=(2, 3, 4), alphas=(4.0, 3.0, 1.0),
              seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, keys in enumerate(keys_per):
        mods = {}
        for k in keys:
            w = model.get_submodule(k).weight
            r = ranks[i]
            mods[k] = LoraModule(torch.randn(r, w.shape[1], generator=g) * 0.3,
                                 torch.randn(w.shape[0], r, generator=g) * 0.3, alpha=alphas[i],
                                 rslora=i == 2)
        out.append(Adapter(modules=mods, source=f"task{i}"))
    return out


def _activations(model, tok, keys, prompts, own=None):
    """``{key: X (tokens, in)}`` in float64 with this test's own hooks (no padding: one prompt
    per forward)."""
    xs = {k: [] for k in keys}
    hs = [model.get_submodule(k).register_forward_pre_hook(
        lambda _m, a, k=k: xs[k].append(a[0].reshape(-1, a[0].shape[-1]).double().clone()))
        for k in keys]
    if own is not None:
        for k, m in own.modules.items():
            lay = model.get_submodule(k)
            hs.append(lay.register_forward_hook(
                lambda _m, a, o, m=m: o + m.scale * (a[0] @ m.down.T) @ m.up.T))
    try:
        for p in prompts:
            ids = tok([p], return_tensors="pt")["input_ids"]
            with torch.no_grad():
                model(input_ids=ids)
    finally:
        for h in hs:
            h.remove()
    return {k: torch.cat(v).numpy() for k, v in xs.items()}


def _np_regmean(ads, xs_per, weights, shrink, key, missing="zero"):
    """D = (sum_i w_i D_i G_i)(sum_i w_i G_i)^-1 with G_i shrunk off the diagonal."""
    num, den = 0.0, 0.0
    for a, xs, w in zip(ads, xs_per, weights, strict=True):
        if key not in a.modules and missing == "skip":
            continue
        x = xs[key]
        g = x.T @ x
        g = shrink * g + (1 - shrink) * np.diag(np.diag(g))
        m = a.modules.get(key)
        if m is not None:
            num = num + w * ((m.scale * m.up.double().numpy() @ m.down.double().numpy()) @ g)
        den = den + w * g
    return np.linalg.solve(den.T, np.asarray(num).T).T


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("shrink", [1.0, 0.5])
def test_regmean_equals_dense_numpy(tiny, shrink):
    model, tok = tiny
    ads = _adapters(model)
    weights = [1.0, 0.5, 2.0]
    merged = lorakit.merge(ads, "regmean", weights, model=(model, tok), calibration=PROMPTS,
                           shrink=shrink, dtype=torch.float64)
    xs = [_activations(model, tok, KEYS, p) for p in PROMPTS]
    for key in KEYS:
        ref = _np_regmean(ads, xs, weights, shrink, key)
        got = merged.modules[key].delta(torch.float64).numpy()
        assert _rel(got, ref) < 1e-5, key
    # factored output: rank sum r_i where all three have the module, 2 + 4 elsewhere
    assert merged.modules[KEYS[0]].rank == 9
    assert merged.modules[KEYS[4]].rank == 6


def test_regmean_own_activations_and_skip(tiny):
    model, tok = tiny
    ads = _adapters(model)
    merged = lorakit.merge(ads, "regmean", model=(model, tok), calibration=PROMPTS, shrink=0.7,
                           activations="own", missing="skip", dtype=torch.float64)
    xs = [_activations(model, tok, KEYS, p, own=a) for p, a in zip(PROMPTS, ads, strict=True)]
    for key in KEYS:
        ref = _np_regmean(ads, xs, [1, 1, 1], 0.7, key, missing="skip")
        assert _rel(merged.modules[key].delta(torch.float64).numpy(), ref) < 1e-5, key


def test_identical_grams_give_weighted_mean(tiny):
    model, tok = tiny
    ads = _adapters(model)
    same = [PROMPTS[0] + PROMPTS[1] + PROMPTS[2]] * 3  # more tokens than features: G invertible
    weights = [1.0, 3.0, 0.5]
    merged = lorakit.merge(ads, "regmean", weights, model=(model, tok), calibration=same,
                           shrink=1.0, dtype=torch.float64)
    key = KEYS[0]
    want = sum(w * a.modules[key].delta(torch.float64) for a, w in zip(ads, weights, strict=True))
    want = want / sum(weights)
    got = merged.modules[key].delta(torch.float64)
    assert float((got - want).norm() / want.norm()) < 1e-6


def test_shrink_zero_is_the_diagonal_solution(tiny):
    model, tok = tiny
    ads = _adapters(model)
    merged = lorakit.merge(ads, "regmean", model=(model, tok), calibration=PROMPTS, shrink=0.0,
                           dtype=torch.float64)
    xs = [_activations(model, tok, KEYS, p) for p in PROMPTS]
    key = KEYS[3]
    num = sum(np.sum(x[key] ** 2, axis=0) * (a.modules[key].delta(torch.float64).numpy())
              for a, x in zip(ads, xs, strict=True) if key in a.modules)
    den = sum(np.sum(x[key] ** 2, axis=0) for x in xs)
    ref = num / den  # column k: sum_i g_ik D_i[:, k] / sum_i g_ik
    assert _rel(merged.modules[key].delta(torch.float64).numpy(), ref) < 1e-6


def test_padding_is_masked_and_inputs_shared(tiny):
    """Batched (padded) capture equals one prompt per forward; q/k/v share one Gram."""
    from lorakit.calibrate import CaptureConfig, capture_grams
    from lorakit.calibrate.grams import resolve_layers

    model, tok = tiny
    ads = _adapters(model)
    layers = resolve_layers(model, ads[0].modules, "tiny")
    gs = capture_grams(model, tok, layers, PROMPTS[2], CaptureConfig(batch_size=3))
    assert gs.groups[KEYS[1]] == gs.groups[KEYS[0]] == gs.groups[KEYS[2]]
    assert len(set(gs.groups.values())) == 4  # qkv, o, up(+gate), down
    assert len(gs.tensors) == 4
    xs = _activations(model, tok, KEYS, PROMPTS[2])
    for key in KEYS:
        ref = xs[key].T @ xs[key]
        assert _rel(gs.get(key).numpy(), ref) < 1e-6, key  # float32 forward noise
    assert gs.tokens == sum(len(p) for p in PROMPTS[2])


def test_spilled_passes_equal_one_pass(tiny, tmp_path):
    from lorakit.calibrate import CaptureConfig, capture_grams
    from lorakit.calibrate.grams import resolve_layers

    model, tok = tiny
    ads = _adapters(model)
    layers = resolve_layers(model, ads[0].modules, "tiny")
    one = capture_grams(model, tok, layers, PROMPTS[0], CaptureConfig())
    small = CaptureConfig(memory_gb=9000 / 2**30)  # one 32x32 float64 Gram per pass
    many = capture_grams(model, tok, layers, PROMPTS[0], small, spill=tmp_path)
    assert len({p for p in many.files.values()}) == 4 and not many.tensors
    for key in KEYS:
        assert torch.equal(one.get(key), many.get(key))


def test_gram_cache_reruns_no_model(tiny, tmp_path):
    model, tok = tiny
    ads = _adapters(model)
    first = lorakit.merge(ads, "regmean", model=(model, tok), calibration=PROMPTS,
                          grams=tmp_path, dtype=torch.float64)
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert len(folders) == 3 and all((tmp_path / f / "index.json").is_file() for f in folders)

    class NoRun(torch.nn.Module):  # same identity, but any forward fails
        config = model.config

        def get_submodule(self, key):
            raise AssertionError("the model was used")

    again = lorakit.merge(ads, "regmean", model=(NoRun(), tok), calibration=PROMPTS,
                          grams=tmp_path, dtype=torch.float64)
    for key in KEYS:
        assert torch.allclose(again.modules[key].delta(torch.float64),
                              first.modules[key].delta(torch.float64), rtol=0, atol=1e-12)
    other = lorakit.merge(ads, "regmean", [1, 2, 1], model=(NoRun(), tok), calibration=PROMPTS,
                          grams=tmp_path, shrink=0.2, policy=RankPolicy.fixed(3))
    assert set(other.ranks().values()) == {3}
    assert sorted(p.name for p in tmp_path.iterdir()) == folders


def test_rank_policy_is_exact_truncation(tiny):
    model, tok = tiny
    ads = _adapters(model)
    full = lorakit.merge(ads, "regmean", model=(model, tok), calibration=PROMPTS,
                         dtype=torch.float64)
    cut = lorakit.merge(ads, "regmean", model=(model, tok), calibration=PROMPTS,
                        policy=RankPolicy.fixed(2), dtype=torch.float64)
    for key in KEYS:
        d = full.modules[key].delta(torch.float64)
        u, s, vh = torch.linalg.svd(d)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        assert float((cut.modules[key].delta(torch.float64) - best).norm()) < 1e-8 * float(s[0])


def test_calibration_files_and_folder(tiny, tmp_path):
    model, tok = tiny
    ads = _adapters(model)
    files = []
    for i, p in enumerate(PROMPTS):
        f = tmp_path / f"task{i}.jsonl"
        f.write_text("".join(json.dumps({"text": t, "label": "x"}) + "\n" for t in p))
        files.append(f)
    a = lorakit.merge(ads, "regmean", model=(model, tok), calibration=PROMPTS)
    b = lorakit.merge(ads, "regmean", model=(model, tok), calibration=",".join(map(str, files)))
    c = lorakit.merge(ads, "regmean", model=(model, tok), calibration=tmp_path)
    for key in KEYS:
        assert torch.equal(a.modules[key].delta(), b.modules[key].delta())
        assert torch.equal(a.modules[key].delta(), c.modules[key].delta())


@pytest.mark.parametrize("case, match", [
    ("empty", "calibration set of adapter 'task1' is empty"),
    ("count", "2 calibration sets for 3 adapters"),
    ("none", "needs calibration prompts"),
    ("folder", "no calibration file for adapter 'task0'"),
    ("name", "the model has no module of this name"),
    ("shape", "the adapter's update is"),
    ("conv", "regmean captures the inputs of linear layers only"),
    ("negative", "must be >= 0"),
    ("model", "needs the base model"),
])
def test_clean_errors(tiny, tmp_path, case, match):
    model, tok = tiny
    ads = _adapters(model)
    calib = PROMPTS
    kw = {"model": (model, tok)}
    weights = None
    if case == "empty":
        calib = [PROMPTS[0], ["  "], PROMPTS[2]]
    elif case == "count":
        calib = PROMPTS[:2]
    elif case == "none":
        calib = None
    elif case == "folder":
        calib = tmp_path
    elif case == "name":
        m = ads[0].modules.pop(KEYS[0])
        ads[0].modules["model.layers.0.self_attn.x_proj"] = m
    elif case == "shape":
        m = ads[0].modules[KEYS[0]]
        ads[0].modules[KEYS[0]] = LoraModule(torch.randn(2, 16), torch.randn(32, 2), alpha=1.0)
        for a in ads[1:]:
            a.modules.pop(KEYS[0])
        del m
    elif case == "conv":
        from lorakit.adapter import ModuleKind

        for a in ads:
            m = a.modules[KEYS[0]]
            a.modules[KEYS[0]] = LoraModule(m.down.reshape(m.rank, -1, 1, 1),
                                            m.up.reshape(-1, m.rank, 1, 1), alpha=1.0,
                                            kind=ModuleKind.CONV)
    elif case == "negative":
        weights = [1, -1, 1]
    elif case == "model":
        kw = {}
    with pytest.raises(LorakitError, match=match):
        lorakit.merge(ads, "regmean", weights, calibration=calib, **kw)


def test_other_methods_refuse_a_model(tiny):
    model, tok = tiny
    with pytest.raises(LorakitError, match="takes no model"):
        lorakit.merge(_adapters(model), "linear", model=(model, tok))


def test_spilled_merge_cleans_up(tiny, tmp_path, monkeypatch):
    """A model whose Grams exceed memory_gb spills them to a private temporary folder, removed
    after the merge, and after a failed capture too; the result equals the in-memory merge."""
    import tempfile

    model, tok = tiny
    ads = _adapters(model)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    small = 9000 / 2**30  # one 32 x 32 float64 Gram per pass
    a = lorakit.merge(ads, "regmean", model=(model, tok), calibration=PROMPTS, memory_gb=small)
    assert list(tmp_path.iterdir()) == []
    b = lorakit.merge(ads, "regmean", model=(model, tok), calibration=PROMPTS)
    for key in KEYS:
        assert torch.allclose(a.modules[key].delta(), b.modules[key].delta(), atol=1e-6)
    layer = model.get_submodule(KEYS[3])
    calls = {"n": 0}

    def boom(_m, _a):
        calls["n"] += 1
        if calls["n"] > 3:  # the probe and the first passes run, then a later pass fails
            raise RuntimeError("disk on fire")

    h = layer.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="disk on fire"):
            lorakit.merge(ads, "regmean", model=(model, tok), calibration=PROMPTS,
                          memory_gb=small)
    finally:
        h.remove()
    assert list(tmp_path.iterdir()) == []
