"""PEFT as a real client of what lorakit writes, on the real third-party adapters.

For each adapter the base model is built from a hand-written transformers config (no download,
fixed seed, float32, eval mode; see ``_models.py``). PEFT loads the original adapter folder onto
it, and a deep copy of the same base loads lorakit's rewrite; the forward outputs on fixed random
ids must agree within ``ATOL``. Besides the outputs, every test checks that

* PEFT holds exactly the tensors of the file it loaded (no key silently dropped or left random),
* PEFT's own per-module update (``get_delta_weight``) is the same for the original and the rewrite,
* the LoRA layers visibly move the output: the effect (original adapter against the same PEFT
  model with every ``lora_B`` zeroed, heads kept) is at least ``MIN_EFFECT`` = 50 x ``ATOL``, so a
  dropped or mis-scaled module cannot hide inside the tolerance. Measured effects (max abs logit
  change): gpt2_tigrinya 2.9, gpt2_anirudh 3.7, gpt2_stathopoan 0.093, distilbert_imdb_tashu 3.7e-3,
  bert_hareshj 8.1e-4 (the random base's pooler squashes it; the per-module delta check is exact
  regardless), roberta_adalora_hadlay 0.081, flan_t5_base_medqna 20, smollm135m_medai_5ep 2.5.

Conversions PEFT -> kohya -> diffusers -> PEFT (API and CLI) and a hand-made mixed-rank /
mixed-alpha adapter (checked against weights merged in the test, outside PEFT's LoRA code) follow.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="PEFT conformance needs transformers (extra: transfer)",
                    exc_type=ImportError)
pytest.importorskip("peft", reason="PEFT conformance needs peft (extra: transfer)",
                    exc_type=ImportError)

import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from conftest import require_real  # noqa: E402
from peft import PeftModel  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

import lorakit  # noqa: E402
from lorakit.cli import cli  # noqa: E402

from ._models import CASES, build_base, forward, fresh_copy, inputs, read_tensors  # noqa: E402

pytestmark = [
    pytest.mark.conformance,
    pytest.mark.real,
    # PEFT 0.21 calls a transformers 5 API that transformers marks deprecated
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

ATOL = 1e-5
MIN_EFFECT = 50 * ATOL
DELTA_RTOL = 1e-6
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(autouse=True, scope="module")
def _two_threads_offline():
    """Two torch threads; HF_HUB_OFFLINE so that no PEFT helper tries to reach the Hub."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield
    torch.set_num_threads(before)


def load_in_peft(base: torch.nn.Module, folder: Path) -> PeftModel:
    """``PeftModel.from_pretrained`` on a local folder, then a check that PEFT holds exactly the
    file's tensors: same keys (no module left at its random/zero init, none ignored), same values."""
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    held = get_peft_model_state_dict(model, save_embedding_layers=False)
    file = read_tensors(folder / WEIGHTS)
    assert sorted(held) == sorted(file), (
        f"PEFT holds {len(held)} tensors for {folder.name}, the file has {len(file)}: "
        f"only PEFT {sorted(set(held) - set(file))[:3]}, only file {sorted(set(file) - set(held))[:3]}")
    for key, t in file.items():
        assert torch.equal(held[key], t), key
    return model


def peft_delta(model: PeftModel, key: str) -> torch.Tensor:
    """The update PEFT itself applies to one module (LoRA or AdaLoRA layer), in weight layout."""
    with torch.no_grad():
        return model.base_model.model.get_submodule(key).get_delta_weight("default").float()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


@torch.no_grad()
def lora_effect(model: PeftModel, with_lora: torch.Tensor, kw: dict) -> float:
    """Max abs change the LoRA layers make: zero every ``lora_B`` (heads stay) and run again.
    Destroys the model's LoRA state; call it last."""
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            p.zero_()
    return float((with_lora - forward(model, kw)).abs().max())


# -- 1. the real adapters, rewritten by lorakit ------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_peft_loads_our_rewrite_with_the_same_forward(name, tmp_path):
    real_dir = require_real(name)
    base = build_base(name, real_dir)
    twin = fresh_copy(base)
    kw = inputs(name)
    bare = forward(base, kw)

    real = load_in_peft(base, real_dir)
    want = forward(real, kw)

    adapter = lorakit.load(real_dir)
    ours_dir = lorakit.save(adapter, tmp_path / "ours", "peft")
    ours = load_in_peft(twin, ours_dir)
    assert type(ours) is type(real)  # same task wrapper (CausalLM, SeqCls, Seq2Seq, plain)
    if name == "roberta_adalora_hadlay":
        # PEFT's AdaLoRA load of the original against our folded plain LoRA
        assert real.peft_config["default"].peft_type == "ADALORA"
        assert ours.peft_config["default"].peft_type == "LORA"
    got = forward(ours, kw)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)

    assert adapter.modules
    for key in adapter.modules:
        err = rel_err(peft_delta(ours, key), peft_delta(real, key))
        assert err < DELTA_RTOL, (key, err)

    assert float((want - bare).abs().max()) > MIN_EFFECT
    effect = lora_effect(real, want, kw)
    assert effect > MIN_EFFECT, f"{name}: LoRA layers move the logits by only {effect:.2e}"


# -- 2. PEFT -> kohya -> diffusers -> PEFT -------------------------------------------------------


def chain_api(src: Path, work: Path) -> Path:
    kohya = lorakit.save(lorakit.convert(lorakit.load(src), "kohya"), work / "k.safetensors",
                         "kohya")
    diff = lorakit.save(lorakit.convert(lorakit.load(kohya), "diffusers"),
                        work / "d.safetensors", "diffusers")
    return lorakit.save(lorakit.convert(lorakit.load(diff), "peft"), work / "peft", "peft")


def chain_cli(src: Path, work: Path) -> Path:
    runner = CliRunner()
    steps = [(src, "kohya", work / "k.safetensors"), (work / "k.safetensors", "diffusers",
             work / "d.safetensors"), (work / "d.safetensors", "peft", work / "peft")]
    for s, to, out in steps:
        res = runner.invoke(cli, ["convert", str(s), "--to", to, "-o", str(out), "--quiet"])
        assert res.exit_code == 0, (to, res.output, res.exception)
    return work / "peft"


# kohya and diffusers files carry no fan_in_fan_out flag, so the PEFT config written at the end says
# False for GPT-2; PEFT sets it back for Conv1D layers with this warning (the forward check below
# shows the result is right).
@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")
@pytest.mark.parametrize("route", ["api", "cli"])
@pytest.mark.parametrize("name", ["gpt2_tigrinya", "smollm135m_medai_5ep"])
def test_kohya_diffusers_round_trip_loads_in_peft(name, route, tmp_path):
    real_dir = require_real(name)
    out = (chain_api if route == "api" else chain_cli)(real_dir, tmp_path)

    # the intermediate files really are kohya and diffusers files
    kohya_keys = read_tensors(tmp_path / "k.safetensors")
    assert kohya_keys and all(k.startswith("lora_") for k in kohya_keys)
    assert any(k.endswith(".lora_down.weight") for k in kohya_keys)
    assert any(k.endswith(".alpha") for k in kohya_keys)
    diff_keys = read_tensors(tmp_path / "d.safetensors")
    assert diff_keys and all(".lora_A." in k or ".lora_B." in k for k in diff_keys)
    assert lorakit.load(tmp_path / "k.safetensors").source_format == "kohya"
    assert lorakit.load(tmp_path / "d.safetensors").source_format == "diffusers"

    base = build_base(name, real_dir)
    twin = fresh_copy(base)
    kw = inputs(name)
    real = load_in_peft(base, real_dir)
    want = forward(real, kw)
    back = load_in_peft(twin, out)
    got = forward(back, kw)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    for key in lorakit.load(real_dir).modules:
        err = rel_err(peft_delta(back, key), peft_delta(real, key))
        assert err < DELTA_RTOL, (key, err)
    assert lora_effect(real, want, kw) > MIN_EFFECT


# -- 3. mixed ranks and alphas: rank_pattern / alpha_pattern ------------------------------------

# truncation rank and alpha per module, cycled over the modules in file order; the real adapter is
# r=16, alpha=32 (None keeps it). Ranks include the full rank and rank 1.
RANK_CYCLE = (16, 1, 5, 12, 8, 3, 16, 7, 2)
ALPHA_CYCLE = (None, 4.0, None, 48.0, 11.5, None, 1.0)


def _plan(keys: list[str]) -> dict[str, tuple[int, float | None]]:
    return {k: (RANK_CYCLE[i % len(RANK_CYCLE)], ALPHA_CYCLE[i % len(ALPHA_CYCLE)])
            for i, k in enumerate(keys)}


def test_mixed_rank_and_alpha_match_a_merged_reference(tmp_path):
    name = "smollm135m_medai_5ep"
    real_dir = require_real(name)
    raw = read_tensors(real_dir / WEIGHTS)
    cfg = json.loads((real_dir / "adapter_config.json").read_text(encoding="utf-8"))
    prefix, suffix_a = "base_model.model.", ".lora_A.weight"
    keys = [k[len(prefix):-len(suffix_a)] for k in raw if k.endswith(suffix_a)]
    plan = _plan(keys)
    assert len({r for r, _ in plan.values()}) > 3 and any(a for _, a in plan.values())

    # the truncated adapter, built by hand and written by lorakit
    src = lorakit.load(real_dir)
    assert sorted(src.modules) == sorted(keys)
    modules = {}
    for key, (k, alpha) in plan.items():
        m = src.modules[key]
        modules[key] = m.with_factors(m.down[:k].clone(), m.up[:, :k].clone(), alpha=alpha)
    out = lorakit.save(src.copy(modules=modules), tmp_path / "mixed", "peft")
    written = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    assert written["rank_pattern"] and written["alpha_pattern"]

    base = build_base(name, real_dir)
    reference = fresh_copy(base)
    kw = inputs(name)
    bare = forward(base, kw)
    model = load_in_peft(base, out)

    # independent reference: W += (alpha_k / k) * B[:, :k] @ A[:k] from the raw file tensors
    with torch.no_grad():
        for key, (k, alpha) in plan.items():
            a = raw[f"{prefix}{key}.lora_A.weight"][:k].float()
            b = raw[f"{prefix}{key}.lora_B.weight"][:, :k].float()
            scale = (cfg["lora_alpha"] if alpha is None else alpha) / k
            reference.get_submodule(key).weight += scale * (b @ a)
            layer = model.base_model.model.get_submodule(key)
            assert layer.r["default"] == k, key
            assert layer.scaling["default"] == pytest.approx(scale, rel=1e-12), key
    got = forward(model, kw)
    want = forward(reference, kw)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert float((got - bare).abs().max()) > MIN_EFFECT
