"""The discriminator: a LoRA sequence classifier telling real task inputs from synthetic ones.

It is trained on the source side, while real data is still available: real inputs are label 1, the
source model's own synthetic inputs label 0. It is saved as a reusable folder::

    D/discriminator.json   task, base model, threshold, counts, held-out accuracy
    D/adapter/             PEFT LoRA (with the classification head in modules_to_save)

so that a transfer needs only the seeds and ``D``. Loading it for another task raises
:class:`ConfigMismatchError`.

Example:
    >>> disc = Discriminator.load("disc_add", task="add")      # doctest: +SKIP
    >>> disc.score(["What is 2+3?"])                          # doctest: +SKIP
    [0.97]
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigMismatchError, CorruptFileError, InputNotFoundError, OptionError
from lorakit.io import atomic_output
from lorakit.transfer.models import ModelRef, load_tokenizer, require_extra
from lorakit.transfer.records import Example, write_examples

META_NAME = "discriminator.json"
FORMAT = "lorakit-discriminator"


@dataclass(frozen=True)
class DiscriminatorOptions:
    """Training settings of the LoRA classifier."""

    rank: int = 8
    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0
    threshold: float = 0.5
    max_length: int = 128
    holdout: float = 0.2


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized score weights" is expected here
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _load_classifier(ref: ModelRef):
    import torch
    from transformers import AutoModelForSequenceClassification

    tok = load_tokenizer(ref)
    try:
        with _quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(
                ref.folder, num_labels=2, dtype=torch.float32, **ref.kwargs())
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise InputNotFoundError(f"cannot load the discriminator model ({type(e).__name__}: {e})",
                                 path=ref.spec) from e
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def _split(items: list[Example], frac: float, rng: random.Random):
    items = list(items)
    rng.shuffle(items)
    n = int(len(items) * frac) if len(items) >= 10 else 0
    return items[n:], items[:n]


def _probs(model, tok, texts: list[str], batch_size: int, max_length: int) -> list[float]:
    import torch

    out: list[float] = []
    model.eval()
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                  max_length=max_length)
        with torch.inference_mode():
            logits = model(**enc).logits  # (batch, 2)
        out += torch.softmax(logits.float(), -1)[:, 1].tolist()
    return out


def _train_loop(model, tok, real: list[str], fake: list[str], options: DiscriminatorOptions,
                advance: Callable[[int], None]) -> float:
    import torch

    rng = random.Random(options.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=options.lr, weight_decay=0.0)
    half = max(1, options.batch_size // 2)
    model.train()
    loss_value = float("nan")
    for _ in range(options.steps):
        texts = [rng.choice(real) for _ in range(half)] + [rng.choice(fake) for _ in range(half)]
        labels = torch.tensor([1] * half + [0] * half)  # (batch,)
        enc = tok(texts, return_tensors="pt", padding=True, truncation=True,
                  max_length=options.max_length)
        loss = torch.nn.functional.cross_entropy(model(**enc).logits.float(), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_value = loss.item()
        advance(1)
    model.eval()
    return loss_value


def train_discriminator(model: str | Path, task: str, real: list[Example],
                        synthetic: list[Example], out: str | Path, *,
                        options: DiscriminatorOptions = DiscriminatorOptions(),
                        force: bool = False, extra_meta: dict[str, Any] | None = None,
                        advance: Callable[[int], None] = lambda n: None) -> Path:
    """Train the real-vs-synthetic classifier on ``model`` and save it to ``out``.

    Example:
        >>> train_discriminator("source_model", "add", real, synthetic, "disc")  # doctest: +SKIP
    """
    require_extra()
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    if not task:
        raise OptionError("a discriminator needs a task name (--task)")
    if not real or not synthetic:
        raise OptionError(f"a discriminator needs real and synthetic inputs (got {len(real)} real, "
                          f"{len(synthetic)} synthetic)")
    ref = ModelRef.parse(model)
    rng = random.Random(options.seed)
    real_train, real_val = _split(real, options.holdout, rng)
    fake_train, fake_val = _split(synthetic, options.holdout, rng)
    torch.manual_seed(options.seed)
    base, tok = _load_classifier(ref)
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=options.rank, lora_alpha=2 * options.rank,
                        lora_dropout=0.0, target_modules="all-linear")
    peft_model = get_peft_model(base, config)
    loss = _train_loop(peft_model, tok, [e.input for e in real_train],
                       [e.input for e in fake_train], options, advance)
    accuracy = None
    if real_val and fake_val:
        p_real = _probs(peft_model, tok, [e.input for e in real_val], options.batch_size,
                        options.max_length)
        p_fake = _probs(peft_model, tok, [e.input for e in fake_val], options.batch_size,
                        options.max_length)
        hits = sum(p >= options.threshold for p in p_real) + sum(p < options.threshold
                                                                for p in p_fake)
        accuracy = hits / (len(p_real) + len(p_fake))
    meta = {"format": FORMAT, "version": 1, "task": task, "base_model": ref.spec,
            "threshold": options.threshold, "real_count": len(real),
            "synthetic_count": len(synthetic), "holdout_accuracy": accuracy,
            "final_loss": loss, "options": asdict(options), **(extra_meta or {})}
    out = Path(out)
    with atomic_output(out, force=force, is_dir=True) as tmp:
        peft_model.save_pretrained(str(tmp / "adapter"))
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        write_examples(tmp / "negatives.jsonl", synthetic)
    return out


class Discriminator:
    """A saved discriminator, loaded for scoring.

    Example:
        >>> Discriminator.load("disc", task="add").score(["2+2="])   # doctest: +SKIP
    """

    def __init__(self, path: Path, meta: dict[str, Any], model, tok) -> None:
        self.path, self.meta, self.model, self.tok = path, meta, model, tok

    @property
    def task(self) -> str:
        return self.meta["task"]

    @property
    def threshold(self) -> float:
        return float(self.meta.get("threshold", 0.5))

    @staticmethod
    def read_meta(path: str | Path, task: str | None = None) -> dict[str, Any]:
        """Read and check ``discriminator.json`` (and the task, when given)."""
        path = Path(path)
        meta_path = path / META_NAME
        if not path.is_dir():
            raise InputNotFoundError("no such discriminator folder", path=path)
        if not meta_path.is_file():
            raise InputNotFoundError(f"not a lorakit discriminator (no {META_NAME})", path=path)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptFileError(f"not valid JSON ({e})", path=meta_path) from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or "task" not in meta:
            raise CorruptFileError(f"not a {FORMAT} file (no 'format'/'task')", path=meta_path)
        if task is not None and meta["task"] != task:
            raise ConfigMismatchError(
                f"this discriminator was trained for task {meta['task']!r}, not {task!r}",
                path=meta_path, key="task",
                hint="train one for this task on the source side, or pass the right --task")
        return meta

    @classmethod
    def load(cls, path: str | Path, *, task: str | None = None,
             model: str | Path | None = None) -> Discriminator:
        """Load a saved discriminator; ``model`` overrides the recorded base model path."""
        require_extra()
        from peft import PeftModel

        path = Path(path)
        meta = cls.read_meta(path, task)
        try:
            base, tok = _load_classifier(ModelRef.parse(model or meta["base_model"]))
        except InputNotFoundError as e:
            if model is None:
                e.hint = (f"the base model recorded in {path / META_NAME} is not here; pass "
                          "its local copy with --discriminator-model")
            raise
        try:
            peft_model = PeftModel.from_pretrained(base, str(path / "adapter"))
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ConfigMismatchError(f"cannot load the classifier adapter ({e})",
                                      path=path / "adapter") from e
        peft_model.eval()
        return cls(path, meta, peft_model, tok)

    def score(self, texts: list[str], *, batch_size: int = 16,
              advance: Callable[[int], None] = lambda n: None) -> list[float]:
        """Probability that each text is a real task input."""
        out: list[float] = []
        max_length = int(self.meta.get("options", {}).get("max_length", 128))
        for i in range(0, len(texts), batch_size):
            chunk = texts[i:i + batch_size]
            out += _probs(self.model, self.tok, chunk, batch_size, max_length)
            advance(len(chunk))
        return out
