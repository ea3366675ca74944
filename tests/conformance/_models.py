"""Base models built from hand-written transformers configs (no download) for the real adapters.

Each real adapter gets the architecture it was trained on, with the module shapes its LoRA factors
and heads need. Only the vocabulary is shrunk (no adapter here touches the embeddings), so a model
builds and runs in about a second on two cores. Layer counts and widths are the real ones.

Import this module only after ``pytest.importorskip("transformers")`` / ``("peft")``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import safe_open

VOCAB = 1000  # shrunk vocabulary; token 0 doubles as bos/eos/pad and never appears in the inputs
BATCH, SEQ = 2, 8


def gpt2_config(num_labels: int = 2) -> transformers.PretrainedConfig:
    """``gpt2`` (12 layers, 768 wide, Conv1D attention/MLP)."""
    return transformers.GPT2Config(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0,
                                   pad_token_id=0, num_labels=num_labels)


def distilbert_config(num_labels: int = 2) -> transformers.PretrainedConfig:
    """``distilbert-base-uncased`` (6 layers, 768 wide)."""
    return transformers.DistilBertConfig(vocab_size=VOCAB, pad_token_id=0, num_labels=num_labels)


def bert_config(num_labels: int = 2) -> transformers.PretrainedConfig:
    """``bert-base-uncased`` (12 layers, 768 wide)."""
    return transformers.BertConfig(vocab_size=VOCAB, pad_token_id=0, num_labels=num_labels)


def roberta_config(num_labels: int = 2) -> transformers.PretrainedConfig:
    """``roberta-base``: RobertaConfig defaults are its shapes (12 layers, 768 wide)."""
    return transformers.RobertaConfig(vocab_size=VOCAB, pad_token_id=0, bos_token_id=0,
                                      eos_token_id=0, num_labels=num_labels)


def flan_t5_base_config(num_labels: int = 2) -> transformers.PretrainedConfig:
    """``google/flan-t5-base`` (T5 v1.1: gated-GELU FFN, untied head, 12+12 layers)."""
    return transformers.T5Config(
        d_model=768, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12, d_kv=64,
        feed_forward_proj="gated-gelu", vocab_size=VOCAB, tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, num_labels=num_labels)


def smollm_135m_config(num_labels: int = 2) -> transformers.PretrainedConfig:
    """``HuggingFaceTB/SmolLM-135M(-Instruct)``: Llama, 30 layers, 576 wide, GQA 9 q / 3 kv heads."""
    return transformers.LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=VOCAB, tie_word_embeddings=True, bos_token_id=0,
        eos_token_id=0, pad_token_id=0, max_position_embeddings=2048, num_labels=num_labels)


@dataclass(frozen=True)
class Case:
    """One real adapter: its architecture and, for SEQ_CLS, the head tensor holding num_labels."""

    config: Callable[..., transformers.PretrainedConfig]
    head: str | None = None  # key (without ``base_model.model.``) whose rows are the labels


CASES: dict[str, Case] = {
    "gpt2_tigrinya": Case(gpt2_config),
    "gpt2_anirudh": Case(gpt2_config, head="score.weight"),
    "gpt2_stathopoan": Case(gpt2_config, head="score.weight"),
    "distilbert_imdb_tashu": Case(distilbert_config, head="classifier.weight"),
    "bert_hareshj": Case(bert_config, head="classifier.weight"),
    "roberta_adalora_hadlay": Case(roberta_config, head="classifier.out_proj.weight"),
    "flan_t5_base_medqna": Case(flan_t5_base_config),
    "smollm135m_medai_5ep": Case(smollm_135m_config),
}

AUTO_CLASS = {
    "CAUSAL_LM": transformers.AutoModelForCausalLM,
    "SEQ_CLS": transformers.AutoModelForSequenceClassification,
    "SEQ_2_SEQ_LM": transformers.AutoModelForSeq2SeqLM,
}


def read_config(adapter_dir: Path) -> dict:
    return json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))


def read_tensors(weights: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, read without lorakit."""
    with safe_open(str(weights), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def build_base(name: str, adapter_dir: Path, seed: int = 0) -> torch.nn.Module:
    """The base model for a real adapter, from its config with a fixed seed, float32, eval mode.

    The Auto class follows the adapter's ``task_type``; without one, the ``auto_mapping`` class
    recorded by PEFT (SmolLM: ``LlamaForCausalLM``). ``num_labels`` is read from the head tensor
    saved in the adapter file.
    """
    case = CASES[name]
    cfg = read_config(adapter_dir)
    num_labels = 2
    if case.head is not None:
        with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
            num_labels = f.get_slice(f"base_model.model.{case.head}").get_shape()[0]
    config = case.config(num_labels=num_labels)
    torch.manual_seed(seed)
    task = cfg.get("task_type")
    if task is not None:
        model = AUTO_CLASS[task].from_config(config)
    else:
        cls_name = (cfg.get("auto_mapping") or {}).get("base_model_class")
        model = getattr(transformers, cls_name)(config)
    return model.to(torch.float32).eval()


def inputs(name: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """Fixed random token ids (batch 2, seq 8); decoder ids too for encoder-decoder models."""
    g = torch.Generator().manual_seed(seed)
    kw = {"input_ids": torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)}
    if "t5" in name:
        kw["decoder_input_ids"] = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)
    return kw


@torch.no_grad()
def forward(model: torch.nn.Module, kw: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**kw).logits.detach().clone()


def fresh_copy(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).eval()
