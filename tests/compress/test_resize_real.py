"""Resize on the real adapters: PEFT reloads mixed-rank outputs, and the global budget beats
uniform ranks at equal parameter count."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from lorakit.lowrank import RankPolicy
from tests.conftest import manifest_entries, real_adapter


def _uniform_vs_budget(adapter, rank):
    uniform, rep_u = lorakit.resize(adapter, RankPolicy.fixed(rank))
    budget = rep_u.params_after
    allocated, rep_b = lorakit.resize(adapter, RankPolicy.from_options(budget=budget))
    return rep_u, rep_b


@pytest.mark.parametrize("entry", manifest_entries(), ids=lambda e: e["name"])
def test_budget_beats_uniform_on_real_adapters(entry, real_adapters):
    adapter = lorakit.load(real_adapters / entry["name"])
    rank = max(1, max(adapter.ranks().values()) // 2)
    rep_u, rep_b = _uniform_vs_budget(adapter, rank)
    print(f"{entry['name']}: rank {rank} uniform total rel. error {rep_u.total_rel_error:.4f}, "
          f"budget ({rep_b.params_after} <= {rep_u.params_after} params) "
          f"{rep_b.total_rel_error:.4f}")
    assert rep_b.params_after <= rep_u.params_after
    assert rep_b.total_rel_error <= rep_u.total_rel_error + 1e-9


def test_mixed_rank_resize_loads_in_peft_and_matches_truncation(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    src = real_adapter("smollm135m_medai_100ep")
    adapter = lorakit.load(src)
    small, report = lorakit.resize(adapter, RankPolicy.from_options(energy=0.8),
                                   dtype=torch.float32)
    ranks = {m.rank for m in small.modules.values()}
    assert len(ranks) > 1, "expected mixed ranks from an energy policy"
    out = lorakit.save(small, tmp_path / "resized", "peft")

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=512,
                                   tie_word_embeddings=True)
    base = transformers.LlamaForCausalLM(cfg).eval()
    reference = copy.deepcopy(base)
    model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    # independent reference: add each module's truncated update B_k A_k into the base weights
    with torch.no_grad():
        for key, m in small.modules.items():
            layer = reference.get_submodule(key)
            layer.weight += m.delta(torch.float32)
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(input_ids=ids).logits
        want = reference(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    loaded_ranks = {k: model.base_model.model.get_submodule(k).r["default"]
                    for k in small.modules}
    assert loaded_ranks == {k: m.rank for k, m in small.modules.items()}
