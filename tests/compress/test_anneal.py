"""In-tuning rank annealing on a tiny PEFT Llama trained on a toy objective: the rank follows the
schedule, each cut is the truncated SVD of the update before it, training continues after each
cut (optimizer reset or projected), and the saved adapter reloads with the final rank."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lorakit.compress.anneal import (
    RankAnnealer,
    geometric_schedule,
    lora_layers,
    shrink_peft_model,
)
from lorakit.errors import OptionError, UnsupportedVariantError
from lorakit.lowrank import RankPolicy

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
# PEFT calls a transformers method deprecated in v5 (upstream, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

VOCAB = 64
SEQ = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))


def llama_base() -> torch.nn.Module:
    """The same tiny Llama (hidden 32, 2 layers, vocab 64) on every call, built from a config."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def gpt2_base() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                  n_positions=64)
    return transformers.GPT2LMHeadModel(cfg)


def peft_model(r=8, alpha=16, targets=("q_proj", "v_proj", "up_proj"), base=llama_base,
               **kw) -> torch.nn.Module:
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                             lora_dropout=0.0, **kw)
    return peft.get_peft_model(base(), config)


def loss_of(model) -> torch.Tensor:
    return model(input_ids=SEQ, labels=SEQ).loss


def adam(model, lr=1e-2) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def train(model, opt, steps) -> None:
    for _ in range(steps):
        loss_of(model).backward()
        opt.step()
        opt.zero_grad()


def snapshot(model) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Each layer's (A, B, scaling) in float64, taken before a cut."""
    return {n: (lay.lora_A["default"].weight.detach().double().numpy(),
                lay.lora_B["default"].weight.detach().double().numpy(),
                float(lay.scaling["default"]))
            for n, lay in lora_layers(model).items()}


def truncated(a: np.ndarray, b: np.ndarray, c: float, k: int) -> np.ndarray:
    """The rank-k truncated SVD of ``c * B @ A`` by numpy (the reference)."""
    u, s, vh = np.linalg.svd(c * b @ a, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def assert_layers_are_truncations(model, before, k, atol=1e-5) -> None:
    """Every layer's output equals base(x) + x @ trunc_k(c B A)^T for a random x."""
    g = torch.Generator().manual_seed(7)
    for name, layer in lora_layers(model).items():
        a, b, c = before[name]
        x = torch.randn(5, layer.in_features, generator=g)
        with torch.no_grad():
            got = layer(x).double().numpy()
            base = layer.get_base_layer()(x).double().numpy()
        want = base + x.double().numpy() @ truncated(a, b, c, min(k, a.shape[0])).T
        np.testing.assert_allclose(got, want, atol=atol, err_msg=name)


def assert_rank(model, k) -> None:
    for name, layer in lora_layers(model).items():
        assert layer.r["default"] == k, name
        assert layer.lora_A["default"].weight.shape[0] == k, name
        assert layer.lora_B["default"].weight.shape[1] == k, name


def assert_optimizer_tracks_model(model, opt) -> None:
    params = [p for g in opt.param_groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(p) for p in trainable}
    assert all(id(p) in {id(q) for q in trainable} for p in opt.state)


def assert_projected(model, opt, before, state_before) -> None:
    """PROJECT's moments, checked through maps recovered here by least squares:
    B' = B M_b and A' = M_a A, so g_B' = g_B M_a^T and g_A' = M_b^T g_A (KEEP_SCALE)."""
    for name, layer in lora_layers(model).items():
        a, b, _ = before[name]
        a2 = layer.lora_A["default"].weight.detach().double().numpy()
        b2 = layer.lora_B["default"].weight.detach().double().numpy()
        m_a = a2 @ np.linalg.pinv(a)  # (k, r)
        m_b = np.linalg.pinv(b) @ b2  # (r, k)
        (ma, va, sa), (mb, vb, sb) = state_before[name]
        st_a = opt.state[layer.lora_A["default"].weight]
        st_b = opt.state[layer.lora_B["default"].weight]
        assert float(st_a["step"]) == sa and float(st_b["step"]) == sb
        for got, want in ((st_a["exp_avg"], m_b.T @ ma), (st_a["exp_avg_sq"], (m_b.T ** 2) @ va),
                          (st_b["exp_avg"], mb @ m_a.T), (st_b["exp_avg_sq"], vb @ (m_a.T ** 2))):
            got = got.double().numpy()
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), name
        assert (st_a["exp_avg_sq"] >= 0).all() and (st_b["exp_avg_sq"] >= 0).all()


def adam_state(model, opt):
    out = {}
    for name, layer in lora_layers(model).items():
        pair = []
        for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            st = opt.state[p]
            pair.append((st["exp_avg"].double().numpy(), st["exp_avg_sq"].double().numpy(),
                         float(st["step"])))
        out[name] = tuple(pair)
    return out


def test_geometric_schedule():
    assert geometric_schedule(64, 8, 3, 1000) == [(250, 32), (500, 16), (750, 8)]
    assert geometric_schedule(8, 2, None, 30) == [(10, 4), (20, 2)]
    assert geometric_schedule(64, 8, None, 100, start_step=20, end_step=60) == \
        [(30, 32), (40, 16), (50, 8)]
    assert [r for _, r in geometric_schedule(10, 7, 3, 100)] == [9, 8, 7]
    with pytest.raises(OptionError, match="start > end >= 1"):
        geometric_schedule(4, 8, 1, 100)
    with pytest.raises(OptionError, match=r"n_cuts must be in \[1, 2\]"):
        geometric_schedule(4, 2, 3, 100)
    with pytest.raises(OptionError, match="2 cuts need at least 3 steps"):
        geometric_schedule(8, 2, 2, 2)
    with pytest.raises(OptionError, match="increasing steps and decreasing ranks"):
        RankAnnealer([(10, 4), (5, 2)])


@pytest.mark.parametrize("mode", ["reset", "project"])
def test_annealing_follows_schedule_and_training_continues(mode, tmp_path):
    model = peft_model()
    opt = adam(model)
    schedule = geometric_schedule(8, 2, None, 30)  # [(10, 4), (20, 2)]
    annealer = RankAnnealer(schedule, optimizer_state=mode)
    losses, cut_at = [], {}
    for step in range(30):
        loss = loss_of(model)
        loss.backward()
        if step in cut_at:  # the first step after a cut: the new factors get gradients ...
            assert all(p.grad is not None and p.grad.abs().sum() > 0
                       for p in model.parameters() if p.requires_grad)
            old = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        if step in cut_at:  # ... and change
            assert all(not torch.equal(p, old[n]) for n, p in model.named_parameters()
                       if p.requires_grad and "lora_" in n)
        due = annealer.due(step + 1)
        before = snapshot(model) if due else None
        state_before = adam_state(model, opt) if due else None
        report = annealer.step(step + 1, model, opt)
        assert (report is None) == (due is None)
        if report is None:
            continue
        cut_at[step + 1] = due
        assert_rank(model, due)
        assert set(report.ranks().values()) == {due}
        assert_layers_are_truncations(model, before, due)
        assert_optimizer_tracks_model(model, opt)
        if mode == "project":
            assert_projected(model, opt, before, state_before)
        else:
            assert not any(opt.state.get(lay.lora_A["default"].weight)
                           for lay in lora_layers(model).values())
    assert cut_at == {10: 4, 20: 2} and annealer.done
    assert [h.rank for h in annealer.history] == [4, 2]
    assert all(math.isfinite(v) for v in losses)
    for lo, hi in ((0, 10), (10, 20), (20, 30)):  # each rank keeps learning
        assert losses[hi - 1] < losses[lo], (lo, losses[lo:hi])
    assert losses[-1] < losses[0]
    _assert_reloads(model, tmp_path, rank=2)


def _assert_reloads(model, tmp_path, rank=None, base=llama_base):
    """save_pretrained -> PeftModel.from_pretrained on a fresh base: ranks and outputs match;
    lorakit reads the same ranks and scales."""
    import lorakit

    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    back = peft.PeftModel.from_pretrained(base(), tmp_path / "adapter").eval()
    want = {n: lay.r["default"] for n, lay in lora_layers(model).items()}
    assert {n: lay.r["default"] for n, lay in lora_layers(back).items()} == want
    if rank is not None:
        assert set(want.values()) == {rank}
    with torch.no_grad():
        a = model(input_ids=SEQ).logits
        b = back(input_ids=SEQ).logits
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    ad = lorakit.load(tmp_path / "adapter")
    assert ad.ranks() == want
    scales = {n: float(lay.scaling["default"]) for n, lay in lora_layers(model).items()}
    assert ad.scales() == pytest.approx(scales, rel=1e-12)


def test_trainer_callback_drives_the_annealer():
    from transformers import TrainerCallback, TrainerControl, TrainerState

    from lorakit.compress import anneal

    model = peft_model()
    opt = adam(model)
    train(model, opt, 2)
    cb = RankAnnealer([(3, 4), (5, 2)], optimizer_state="project").trainer_callback()
    assert isinstance(cb, TrainerCallback) and isinstance(cb, anneal.RankAnnealingCallback)
    control = TrainerControl()
    cb.on_step_end(None, TrainerState(global_step=2), control, model=model, optimizer=opt)
    assert_rank(model, 8)
    cb.on_step_end(None, TrainerState(global_step=3), control, model=model, optimizer=opt)
    assert_rank(model, 4)
    assert_optimizer_tracks_model(model, opt)
    train(model, opt, 1)
    cb.on_step_end(None, TrainerState(global_step=7), control, model=model, optimizer=opt)
    assert_rank(model, 2)
    assert cb.annealer.done and [h.step for h in cb.annealer.history] == [3, 7]


def test_real_trainer_run_anneals(tmp_path):
    """A short transformers Trainer run (accelerate wraps the optimizer) with the callback."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            return {"input_ids": SEQ[i % 4], "labels": SEQ[i % 4]}

    class Snapshot(TrainerCallback):  # runs after the annealer's callback
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 8:
                self.after_cut = {n: p.detach().clone() for n, p in model.named_parameters()
                                  if p.requires_grad}

    model, snap = peft_model(), Snapshot()
    annealer = RankAnnealer([(4, 4), (8, 2)], optimizer_state="project")
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=12, learning_rate=1e-2,
                             per_device_train_batch_size=4, report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Data(),
                      callbacks=[annealer.trainer_callback(), snap])
    trainer.train()
    assert [h.step for h in annealer.history] == [4, 8]
    assert_rank(model, 2)
    assert_optimizer_tracks_model(model, trainer.optimizer)
    assert all(not torch.equal(p, snap.after_cut[n]) for n, p in model.named_parameters()
               if p.requires_grad)
    _assert_reloads(model, tmp_path, rank=2)


def test_cut_at_initialisation_keeps_every_direction_trainable():
    model = peft_model()  # lora_B is zero: the update has no nonzero singular value
    with torch.no_grad():
        ref = model(input_ids=SEQ).logits
    shrink_peft_model(model, 4)
    assert_rank(model, 4)
    for layer in lora_layers(model).values():
        assert layer.lora_B["default"].weight.abs().sum() == 0
        assert (layer.lora_A["default"].weight.abs().sum(dim=1) > 0).all()  # fresh A rows
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=SEQ).logits, ref, atol=0, rtol=0)
    opt = adam(model)
    train(model, opt, 1)
    assert all(layer.lora_B["default"].weight.abs().sum() > 0
               for layer in lora_layers(model).values())


@pytest.mark.parametrize("rule,rslora", [("keep_scale", True), ("keep_alpha", False)])
def test_scale_rules_keep_the_function_and_reload(rule, rslora, tmp_path):
    model = peft_model(use_rslora=rslora)
    train(model, adam(model), 3)
    before = snapshot(model)
    shrink_peft_model(model, 3, scale_rule=rule)
    assert_layers_are_truncations(model, before, 3)
    for name, layer in lora_layers(model).items():
        c_old = before[name][2]
        if rule == "keep_scale":
            assert layer.scaling["default"] == pytest.approx(c_old)
            assert layer.lora_alpha["default"] == pytest.approx(c_old * math.sqrt(3))
        else:
            assert layer.lora_alpha["default"] == 16
            assert layer.scaling["default"] == pytest.approx(16 / 3)
    _assert_reloads(model, tmp_path, rank=3)


def test_policy_gives_mixed_ranks_that_reload(tmp_path):
    model = peft_model()
    train(model, adam(model), 6)
    before = snapshot(model)
    report = shrink_peft_model(model, RankPolicy.from_options(energy=0.9))
    for name, (a, b, c) in before.items():
        s = np.linalg.svd(c * b @ a, compute_uv=False)
        e = np.cumsum(s ** 2) / (s ** 2).sum()
        assert report.ranks()[name] == int(np.argmax(e >= 0.9 - 1e-12)) + 1, name
    ranks = report.ranks()
    assert len(set(ranks.values())) > 1
    assert model.peft_config["default"].rank_pattern
    _assert_reloads(model, tmp_path)


def test_gpt2_conv1d_layers(tmp_path):
    model = peft_model(targets=("c_attn",), base=gpt2_base, fan_in_fan_out=True)
    train(model, adam(model), 3)
    before = snapshot(model)
    shrink_peft_model(model, 2)
    assert_layers_are_truncations(model, before, 2)
    _assert_reloads(model, tmp_path, rank=2, base=gpt2_base)


def test_refusals_name_the_layer_and_change_nothing():
    with pytest.raises(UnsupportedVariantError, match="DoRA"):
        shrink_peft_model(peft_model(use_dora=True), 4)
    model = peft_model(targets=("embed_tokens", "q_proj"))
    with pytest.raises(UnsupportedVariantError,
                       match=r"model\.embed_tokens: .*Embedding \(only lora\.Linear\)"):
        shrink_peft_model(model, 4)
    model = peft_model()
    opt = torch.optim.Adamax([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train(model, opt, 1)
    with pytest.raises(OptionError, match=r"\['exp_inf'\] of Adamax cannot be projected.*reset"):
        shrink_peft_model(model, 4, optimizer=opt, optimizer_state="project")
    assert_rank(model, 8)  # checked before anything changed
    shrink_peft_model(model, 4, optimizer=opt, optimizer_state="reset")
    assert_optimizer_tracks_model(model, opt)
    with pytest.raises(OptionError, match="no adapter named 'other'"):
        shrink_peft_model(model, 2, adapter_name="other")
