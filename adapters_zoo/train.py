"""Training and evaluation helpers shared by ``build.py`` (the zoo) and ``bench/quality.py``.

* :func:`train_lora`: a seeded PEFT LoRA training loop on CPU (AdamW, linear warm-up, cosine
  decay), loss on the answer tokens only (the vocabulary projection runs only where a label is),
  with optional in-tuning rank annealing (:class:`lorakit.compress.anneal.RankAnnealer`).
* :func:`peft_to_adapter`: a trained PEFT model as a lorakit :class:`~lorakit.Adapter`.
* :func:`applied`: a context manager that adds an adapter's updates ``scale * B @ A`` to the base
  model's weights in place and restores them after (evaluation with no PEFT wrappers).

Example:
    >>> model, tok = load_smollm2()                                        # doctest: +SKIP
    >>> run = train_lora(model, tok, TASKS["date"], TrainConfig(steps=20))  # doctest: +SKIP
    >>> adapter = peft_to_adapter(run.model)                               # doctest: +SKIP
    >>> with applied(model, adapter):                                      # doctest: +SKIP
    ...     TASKS["date"].score(model, tok)
"""

from __future__ import annotations

import contextlib
import math
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from adapters_zoo.tasks import Task, collate
from lorakit.adapter import Adapter
from lorakit.errors import ShapeMismatchError

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class TrainConfig:
    """One LoRA training run. ``mlp_layers`` adds ``up_proj``/``down_proj`` in those layers.

    Example:
        >>> TrainConfig(steps=10).scale
        2.0
    """

    steps: int = 100
    batch_size: int = 8
    lr: float = 2e-3
    warmup: float = 0.1  # fraction of steps
    rank: int = 16
    alpha: float = 32.0
    seed: int = 0
    targets: tuple[str, ...] = ATTENTION
    mlp_layers: tuple[int, ...] = ()
    mlp_targets: tuple[str, ...] = ("up_proj", "down_proj")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def target_modules(self) -> str | list[str]:
        """PEFT ``target_modules``: a list, or a full-match regex when MLP layers are chosen."""
        if not self.mlp_layers:
            return list(self.targets)
        att = "|".join(self.targets)
        layers = "|".join(str(i) for i in self.mlp_layers)
        mlp = "|".join(self.mlp_targets)
        return (rf".*\.layers\.\d+\.self_attn\.({att})"
                rf"|.*\.layers\.({layers})\.mlp\.({mlp})")


@dataclass
class TrainRun:
    """A finished run: the PEFT model, the per-step losses and the wall time."""

    model: Any
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    cuts: list[tuple[int, int]] = field(default_factory=list)

    def final_loss(self, window: int = 10) -> float:
        tail = self.losses[-window:]
        return sum(tail) / max(len(tail), 1)


def batches(task: Task, tokenizer: Any, batch_size: int, seed: int,
            examples: Sequence[tuple[str, str]] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled training batches: a fresh seeded permutation each epoch."""
    data = [task.encode(tokenizer, x, y) for x, y in (examples or task.train)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rng = random.Random(seed)
    while True:
        order = list(range(len(data)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([data[j] for j in order[i:i + batch_size]], pad)


def answer_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the labelled next tokens; the head runs only where a label is."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = inner.model(input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"]).last_hidden_state  # (b, w, h)
    labels = batch["labels"][:, 1:]  # (b, w - 1)
    keep = labels != -100
    logits = inner.lm_head(hidden[:, :-1][keep])  # (n, vocab)
    return torch.nn.functional.cross_entropy(logits.float(), labels[keep])


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def wrap_lora(model: Any, cfg: TrainConfig) -> Any:
    """The base model wrapped with a fresh, seeded PEFT LoRA (the base weights are not copied)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)  # PEFT draws lora_A from torch's global generator
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, bias="none",
                      target_modules=cfg.target_modules(), task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


def train_lora(model: Any, tokenizer: Any, task: Task, cfg: TrainConfig, *,
               annealer: Any = None, peft_model: Any = None,
               log: Callable[[str], None] | None = None) -> TrainRun:
    """Train a LoRA on ``task.train`` (or go on training ``peft_model``); deterministic for a seed
    and a thread count. ``annealer`` (a RankAnnealer) cuts ranks during training."""
    pm = peft_model if peft_model is not None else wrap_lora(model, cfg)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    warm = max(1, int(cfg.warmup * cfg.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg.steps, warm))
    stream = batches(task, tokenizer, cfg.batch_size, cfg.seed)
    run = TrainRun(pm)
    start = time.perf_counter()
    pm.train()
    for step in range(cfg.steps):
        loss = answer_loss(pm, next(stream))
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"task {task.name}: loss is {value} at step {step}")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        run.losses.append(value)
        if annealer is not None and annealer.step(step + 1, pm, opt) is not None:
            run.cuts.append((step + 1, annealer.history[-1].rank))
        if log and (step % 20 == 0 or step == cfg.steps - 1):
            log(f"{task.name} step {step + 1}/{cfg.steps} loss {run.final_loss(5):.4f} "
                f"lr {sched.get_last_lr()[0]:.2e} {time.perf_counter() - start:.0f}s")
    pm.eval()
    run.seconds = time.perf_counter() - start
    return run


def peft_to_adapter(peft_model: Any) -> Adapter:
    """The PEFT model's LoRA as a lorakit Adapter (through PEFT's own ``save_pretrained``)."""
    from lorakit.formats.peft import load_peft

    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        return load_peft(tmp)


def unwrap(peft_model: Any) -> Any:
    """Remove the LoRA layers and return the untouched base model."""
    return peft_model.unload()


@contextlib.contextmanager
def applied(model: Any, adapter: Adapter | None) -> Iterator[Any]:
    """Add ``scale * B @ A`` of every module to the base weights (float32), restore on exit."""
    if adapter is None:
        yield model
        return
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for key, m in adapter.modules.items():
                layer = model.get_submodule(key)
                w = layer.weight  # (out, in)
                delta = m.delta().to(w.dtype)  # (out, in)
                if delta.shape != w.shape:
                    raise ShapeMismatchError(f"module {key}: update {tuple(delta.shape)} does "
                                             f"not fit the weight {tuple(w.shape)}", key=key)
                saved[key] = w.detach().clone()
                w.add_(delta)
        yield model
    finally:
        with torch.no_grad():
            for key, w in saved.items():
                model.get_submodule(key).weight.copy_(w)
