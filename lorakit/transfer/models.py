"""Loading the models a transfer uses, through transformers and peft (the ``transfer`` extra).

A model is named by a local folder, a local ``.gguf`` file (dequantised by transformers' GGUF
reader) or a Hub id. Anything that cannot be loaded becomes :class:`InputNotFoundError` naming it.

Example:
    >>> model, tok = load_causal_lm("HuggingFaceTB/SmolLM2-135M-Instruct")   # doctest: +SKIP
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import (
    ConfigMismatchError,
    CorruptFileError,
    InputNotFoundError,
    LorakitError,
    MissingDependencyError,
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def require_extra() -> None:
    """Raise :class:`MissingDependencyError` unless transformers and peft import."""
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(
            f"lorakit transfer needs transformers and peft ({e.name} is missing)",
            hint="pip install 'lorakit[transfer]'") from e


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from: ``folder`` (a local folder or Hub id) and an optional GGUF file
    inside it."""

    spec: str
    folder: str
    gguf_file: str | None = None
    alias: str | None = None  # the Hub id a local copy stands for (as adapters record it)

    @classmethod
    def parse(cls, spec: str | Path) -> ModelRef:
        """Resolve ``spec``; a missing local path raises :class:`InputNotFoundError`.

        Example:
            >>> ModelRef.parse("org/model").folder
            'org/model'
        """
        spec = str(spec)
        p = Path(spec).expanduser()
        if p.is_file() and p.suffix == ".gguf":
            return cls(spec, str(p.parent), p.name)
        if p.is_dir():
            return cls(spec, str(p))
        if p.exists():
            raise InputNotFoundError("is a file but not a .gguf model; expected a model folder, "
                                     "a .gguf file or a Hub id", path=spec)
        if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
            return cls(spec, spec)
        raise InputNotFoundError("no such model folder or file, and not a Hub id", path=spec)

    def names(self) -> set[str]:
        """Every string a PEFT config may use for this model as ``base_model_name_or_path``."""
        out = {self.spec, self.folder} | ({self.alias} if self.alias else set())
        for s in (self.spec, self.folder):
            p = Path(s).expanduser()
            if p.exists():
                out.add(str(p.resolve()))
        return out

    def kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def _load(what: str, ref: ModelRef, loader, **kwargs):
    try:
        return loader(ref.folder, **ref.kwargs(), **kwargs)
    except LorakitError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise InputNotFoundError(f"cannot load the {what} ({type(e).__name__}: {e})",
                                 path=ref.spec,
                                 hint="give a local model folder, a .gguf file or a Hub id "
                                      "available offline") from e


def load_tokenizer(ref: ModelRef):
    """The tokenizer of ``ref``, with a pad token and left padding (for batched generation)."""
    from transformers import AutoTokenizer

    tok = _load("tokenizer", ref, AutoTokenizer.from_pretrained)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "left"
    return tok


def load_causal_lm(spec: str | Path | ModelRef, *, dtype: str = "float32"):
    """``(model, tokenizer)`` for a causal LM, in eval mode on CPU.

    Example:
        >>> model, tok = load_causal_lm("path/to/model")   # doctest: +SKIP
    """
    require_extra()
    import torch
    from transformers import AutoModelForCausalLM

    ref = spec if isinstance(spec, ModelRef) else ModelRef.parse(spec)
    tok = load_tokenizer(ref)
    model = _load("model", ref, AutoModelForCausalLM.from_pretrained,
                  dtype=getattr(torch, dtype))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    model.eval()
    return model, tok


def adapter_config(adapter: str | Path) -> dict[str, Any]:
    """The ``adapter_config.json`` of a PEFT folder, with named errors."""
    folder = Path(adapter)
    cfg = folder / "adapter_config.json"
    if not folder.is_dir():
        raise InputNotFoundError("no such adapter folder (expected a PEFT folder)", path=folder)
    if not cfg.is_file():
        raise InputNotFoundError("no adapter_config.json (expected a PEFT folder)", path=folder)
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"not valid JSON ({e})", path=cfg) from e
    if not isinstance(data, dict):
        raise CorruptFileError("not a JSON object", path=cfg)
    return data


def check_adapter_base(adapter: str | Path, source: ModelRef) -> None:
    """Refuse an adapter whose ``base_model_name_or_path`` is not ``source``.

    Example:
        >>> check_adapter_base("adapter_dir", ModelRef.parse("org/model"))   # doctest: +SKIP
    """
    cfg = adapter_config(adapter)
    base = cfg.get("base_model_name_or_path")
    if not base:
        return  # nothing recorded: the load itself checks the shapes
    names = source.names()
    p = Path(str(base)).expanduser()
    if base in names or (p.exists() and str(p.resolve()) in names):
        return
    raise ConfigMismatchError(
        f"the adapter was trained on {base!r} but --source-model is {source.spec!r}",
        path=Path(adapter) / "adapter_config.json", key="base_model_name_or_path",
        hint="pass the adapter's base model as --source-model; for a local copy of a Hub "
             "model name it with --source-name; --no-check-base skips this check")


def load_teacher(source: ModelRef, adapter: str | Path, *, check_base: bool = True):
    """``(model, tokenizer)``: the source model with its adapter, ready for greedy labelling."""
    require_extra()
    from peft import PeftModel

    if check_base:
        check_adapter_base(adapter, source)
    else:
        adapter_config(adapter)
    model, tok = load_causal_lm(source)
    try:
        model = PeftModel.from_pretrained(model, str(adapter))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ConfigMismatchError(f"peft cannot load this adapter onto {source.spec!r} "
                                  f"({type(e).__name__}: {e})", path=adapter) from e
    model.eval()
    return model, tok
