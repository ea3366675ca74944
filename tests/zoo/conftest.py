"""A tiny Llama built from a config and a character-level tokenizer built offline, for the zoo
harness tests (no download), plus the benchmark script imported as a module."""

from __future__ import annotations

import importlib.util
import string
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("transformers", reason="the zoo harness needs the `zoo` extra")
pytest.importorskip("peft", reason="the zoo harness needs the `zoo` extra")

CHARS = string.ascii_letters + string.digits + " \n:+=->.,'|[]()"


def char_tokenizer():
    """A PreTrainedTokenizerFast with one token per character (ids 3..), built in memory."""
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


def tiny_llama(vocab_size: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                      pad_token_id=2, tie_word_embeddings=True,
                      initializer_range=0.3)  # large enough for peaked next-token logits
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model


@pytest.fixture
def tiny():
    """A fresh ``(model, tokenizer)`` pair (fresh: tests add LoRA layers to it)."""
    tok = char_tokenizer()
    return tiny_llama(len(tok)), tok


@pytest.fixture(scope="session")
def quality():
    """``bench/quality.py`` as a module."""
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = mod
    spec.loader.exec_module(mod)
    return mod
