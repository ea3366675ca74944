"""Two tiny causal LMs built offline from different configs and tokenizers, and a source adapter.

* source: a Llama config with a word-level tokenizer (its own vocabulary of task words);
* target: a GPT-2 config (Conv1D layers) with a byte-level, character tokenizer.

Both are random and a few thousand parameters wide, so the whole pipeline runs in seconds.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

WORDS = ["what", "is", "plus", "minus", "times", "the", "sum", "of", "and", "?", "="] + [
    str(i) for i in range(20)]


def real_examples(n: int, seed: int = 0) -> list[dict]:
    """Toy arithmetic questions: the 'real task data'."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        out.append({"input": f"what is {a} plus {b} ?", "output": str(a + b)})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def _char_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(chars))}
    vocab["<|endoftext|>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Folders: ``source``, ``target`` (models + tokenizers), ``adapter`` (LoRA on the source),
    ``seeds`` and ``real`` (JSONL)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny_models")
    torch.manual_seed(0)
    wt = _word_tokenizer()
    src = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(wt), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=wt.pad_token_id, bos_token_id=wt.bos_token_id,
        eos_token_id=wt.eos_token_id))
    src.save_pretrained(root / "source")
    wt.save_pretrained(root / "source")
    ct = _char_tokenizer()
    tgt = GPT2LMHeadModel(GPT2Config(
        vocab_size=len(ct), n_embd=32, n_layer=2, n_head=4, n_positions=256,
        bos_token_id=ct.eos_token_id, eos_token_id=ct.eos_token_id))
    tgt.save_pretrained(root / "target")
    ct.save_pretrained(root / "target")
    # the source adapter: random B (init_lora_weights=False) so the teacher differs from the base
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                     init_lora_weights=False)
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(root / "source"), cfg)
    peft_model.save_pretrained(root / "adapter")
    acfg = json.loads((root / "adapter" / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == str(root / "source")
    rows = real_examples(40)
    return {"root": root, "source": root / "source", "target": root / "target",
            "adapter": root / "adapter", "seeds": write_jsonl(root / "seeds.jsonl", rows[:6]),
            "real": write_jsonl(root / "real.jsonl", rows)}
