"""Training a fresh LoRA on the target model by sequence-level distillation.

Each example is rendered as ``prompt + answer + eos`` with the target's own tokenizer; the loss is
the cross-entropy of the answer tokens only. Rows are left-padded so that every answer ends at the
last position, which lets the model compute logits for the answer tail alone
(``logits_to_keep``) instead of the whole vocabulary at every prompt position.

Example:
    >>> opts = StudentOptions(rank=8, steps=100, lr=5e-4)
    >>> opts.lora_alpha
    16.0
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import OptionError
from lorakit.io import atomic_output
from lorakit.transfer.prompts import PromptFormat
from lorakit.transfer.records import Example

ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class StudentOptions:
    """Settings of the new adapter and its training run."""

    rank: int = 8
    alpha: float | None = None  # default 2 * rank
    target_modules: tuple[str, ...] = (ALL_LINEAR,)
    layers: tuple[int, ...] | None = None  # only these layer indices (None: all)
    steps: int = 100
    lr: float = 5e-4
    batch_size: int = 8
    seed: int = 0
    max_length: int = 256

    def __post_init__(self) -> None:
        if self.rank < 1 or self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise OptionError(f"rank, steps and batch size must be >= 1 and lr > 0 (got rank "
                              f"{self.rank}, steps {self.steps}, batch {self.batch_size}, "
                              f"lr {self.lr})")

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else 2 * self.rank)

    def peft_targets(self) -> str | list[str]:
        t = list(self.target_modules)
        return ALL_LINEAR if t == [ALL_LINEAR] else t


def encode(tok, fmt: PromptFormat, ex: Example, max_length: int) -> tuple[list[int], int]:
    """``(ids, n_answer)``: the token ids of prompt + answer (+ eos) and how many of them, at the
    end, are answer tokens (the ones trained on).

    Example:
        >>> encode(tok, PromptFormat("{input}="), Example("1+2", "3"), 64)   # doctest: +SKIP
        ([16, 10, 17, 28, 18, 256], 2)
    """
    prompt = fmt.render(ex.input)
    enc = tok(fmt.full(ex.input, ex.output), add_special_tokens=fmt.special_tokens,
              return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    # a token is an answer token when its text ends past the prompt (a token straddling the
    # boundary counts as answer); special tokens have the empty span (0, 0)
    n_answer = sum(1 for (s, e) in enc["offset_mapping"] if e > len(prompt) and e > s)
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
        n_answer += 1
    if len(ids) > max_length:  # keep the answer, cut the prompt from the left
        ids = ids[-max_length:]
        n_answer = min(n_answer, max_length)
    return ids, n_answer


def collate(rows: list[tuple[list[int], int]], pad_id: int):
    """Left-pad rows to one length; returns tensors and ``keep`` (answer tail length + 1).

    ``input_ids``/``attention_mask``/``position_ids``/``answer_mask``: (batch, L).

    Example:
        >>> ids, attn, pos, answer, keep = collate([([5, 6, 7], 1), ([8, 9], 1)], 0)
        >>> ids.tolist(), keep
        ([[5, 6, 7], [0, 8, 9]], 2)
    """
    import torch

    length = max(len(ids) for ids, _ in rows)
    keep = max(n for _, n in rows) + 1
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), length), dtype=torch.long)
    answer = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, (ids, n) in enumerate(rows):
        input_ids[i, length - len(ids):] = torch.tensor(ids)
        attn[i, length - len(ids):] = 1
        answer[i, length - n:] = True
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)  # (batch, L)
    return input_ids, attn, position_ids, answer, min(keep, length)


def answer_loss(model, batch) -> Any:
    """Mean cross-entropy of the answer tokens of one collated batch.

    Example:
        >>> answer_loss(model, collate(rows, tok.pad_token_id)).item()   # doctest: +SKIP
        2.31
    """
    import torch

    input_ids, attn, position_ids, answer, keep = batch
    logits = model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids,
                   logits_to_keep=keep).logits  # (batch, keep, vocab): positions L-keep..L-1
    logits = logits[:, :-1].float()  # predicts tokens L-keep+1..L-1
    targets = input_ids[:, -keep + 1:]  # (batch, keep-1)
    mask = answer[:, -keep + 1:]
    return torch.nn.functional.cross_entropy(logits[mask], targets[mask])


def train_student(model, tok, data: list[Example], fmt: PromptFormat, options: StudentOptions,
                  *, advance: Callable[[int], None] = lambda n: None):
    """Wrap ``model`` in a fresh LoRA and train it on ``data``; returns ``(peft_model, losses)``.

    Example:
        >>> peft_model, losses = train_student(m, tok, data, PromptFormat(), StudentOptions())
        ... # doctest: +SKIP
    """
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    if not data:
        raise OptionError("no training examples left (the filter rejected every synthetic "
                          "input?)", hint="lower --filter-threshold or raise --synthetic")
    torch.manual_seed(options.seed)
    rng = random.Random(options.seed)
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=options.rank,
                        lora_alpha=options.lora_alpha, lora_dropout=0.0,
                        target_modules=options.peft_targets(),
                        layers_to_transform=list(options.layers) if options.layers else None)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:
        raise OptionError(f"target modules {list(options.target_modules)} do not fit the target "
                          f"model ({e})", key="--target-modules") from e
    rows = [encode(tok, fmt, ex, options.max_length) for ex in data]
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=options.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, options.steps // 10))
        * max(0.0, 1 - s / options.steps))  # short warmup, linear decay
    order: list[int] = []
    losses: list[float] = []
    peft_model.train()
    for _ in range(options.steps):
        if len(order) < options.batch_size:
            perm = list(range(len(rows)))
            rng.shuffle(perm)
            order += perm * max(1, options.batch_size // len(rows) + 1)
        idx, order = order[:options.batch_size], order[options.batch_size:]
        loss = answer_loss(peft_model, collate([rows[i] for i in idx], tok.pad_token_id))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        advance(1)
    peft_model.eval()
    return peft_model, losses


def save_student(peft_model, out: Path, *, base_model: str, card: str, record: dict[str, Any],
                 force: bool = False) -> Path:
    """Write the trained adapter as a PEFT folder with its model card and ``transfer.json``.

    Example:
        >>> save_student(peft_model, Path("out"), base_model="t", card="# card", record={})
        ... # doctest: +SKIP
    """
    out = Path(out)
    with atomic_output(out, force=force, is_dir=True) as tmp:
        peft_model.save_pretrained(str(tmp))
        cfg_path = tmp / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = base_model
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(card)
        (tmp / "transfer.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def options_dict(options: StudentOptions) -> dict[str, Any]:
    """The training settings as recorded in the model card.

    Example:
        >>> options_dict(StudentOptions(rank=4))["alpha"]
        8.0
    """
    d = asdict(options)
    d["target_modules"] = list(options.target_modules)
    d["layers"] = list(options.layers) if options.layers else "all"
    d["alpha"] = options.lora_alpha
    return d
