"""Input Gram matrices of a model's linear layers on calibration prompts (for ``regmean``).

For each adapted linear layer and each adapter's prompts, ``G = X^T X`` ``(in, in)`` where ``X``
``(tokens, in)`` holds the layer's inputs at every non-padding token. Forward pre-hooks take the
inputs; the per-batch product and the running sum are float64.

* **Shared inputs, one Gram.** A first forward pass on one prompt (the probe) records which
  tensor object each hooked layer receives: layers handed the same tensor (``q/k/v_proj`` read one
  normalised hidden state, ``gate/up_proj`` another) form one group, whose Gram is captured once
  through its first layer and shared by the others (:attr:`GramSet.groups`).
* **Base or own activations.** By default the base model runs (``activations=base``); with
  ``own`` each adapter's update is added to its layers' outputs by forward hooks while its prompts
  run, so later layers see the inputs that adapter produces. No weight is modified.
* **Bounded memory.** One float64 Gram is ``8 in^2`` bytes. Groups are packed, in execution
  order, into passes whose Grams fit ``memory_gb``; each pass runs the prompts only up to its last
  layer (the forward stops there), then its Grams are written to a safetensors file and freed. A
  model whose Grams fit runs one pass. So the resident Grams never exceed the budget (plus the one
  group that alone exceeds it), whatever the depth of the model.

Example:
    >>> gs = capture_grams(model, tok, ["model.layers.0.self_attn.q_proj"], ["1 + 2 ="])  # doctest: +SKIP
    >>> gs.get("model.layers.0.self_attn.q_proj").shape                                 # doctest: +SKIP
    torch.Size([576, 576])
"""

from __future__ import annotations

import enum
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.adapter import LoraModule, ModuleKind
from lorakit.errors import (
    ConfigMismatchError,
    CorruptFileError,
    ShapeMismatchError,
    UnsupportedVariantError,
)

INDEX = "index.json"
FORMAT_VERSION = 1


class Activations(str, enum.Enum):
    """Whose activations the Grams are taken on: the base model's or each adapter's own."""

    BASE = "base"
    OWN = "own"


@dataclass
class GramSet:
    """One calibration set's Grams: ``groups`` maps a module key to its Gram's key (modules that
    share an input share one Gram); Grams live in ``tensors`` or in safetensors ``files``.

    Example:
        >>> g = GramSet({"q": "q", "k": "q"}, 3, tensors={"q": torch.eye(2, dtype=torch.float64)})
        >>> g.get("k").tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """

    groups: dict[str, str]
    tokens: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    _open: dict[Path, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def get(self, key: str) -> torch.Tensor | None:
        """The float64 Gram ``(in, in)`` of module ``key`` (None if it has none)."""
        gk = self.groups.get(key)
        if gk is None:
            return None
        if gk in self.tensors:
            return self.tensors[gk]
        path = self.files.get(gk)
        if path is None:
            return None
        if path not in self._open:
            from lorakit.io import read_safetensors

            self._open.clear()  # one chunk file mapped at a time
            self._open[path] = read_safetensors(path)[0]
        try:
            return self._open[path][gk]
        except KeyError:
            raise CorruptFileError("a Gram listed in the index is missing", path=path,
                                   key=gk) from None


# --------------------------------------------------------------------------- cache folders


def save_index(folder: Path, gs: GramSet, meta: dict[str, Any]) -> None:
    """Write ``index.json`` (last: a folder without it is an unfinished capture)."""
    index = {"version": FORMAT_VERSION, "tokens": gs.tokens, "groups": gs.groups,
             "files": {k: p.name for k, p in gs.files.items()}, "meta": meta}
    (folder / INDEX).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")


def load_gram_set(folder: Path) -> GramSet | None:
    """The Grams cached in ``folder`` (None when there is no finished capture there)."""
    idx = folder / INDEX
    if not idx.is_file():
        return None
    try:
        data = json.loads(idx.read_text())
        files = {k: folder / name for k, name in data["files"].items()}
        gs = GramSet(dict(data["groups"]), int(data["tokens"]), files=files)
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptFileError(f"not a lorakit Gram index ({e})", path=idx) from e
    missing = sorted({str(p) for p in files.values() if not p.is_file()})
    if missing:
        raise CorruptFileError("the Gram cache is incomplete (a listed file is missing)",
                               path=missing[0], hint="delete the folder to capture again")
    return gs


# ------------------------------------------------------------------------------ the model


def layer_width(layer: Any) -> tuple[int, int] | None:
    """``(out, in)`` of a linear layer (``nn.Linear`` or transformers' ``Conv1D``), else None."""
    w = getattr(layer, "weight", None)
    if not isinstance(w, torch.Tensor) or w.ndim != 2:
        return None
    if isinstance(layer, torch.nn.Linear):
        return int(w.shape[0]), int(w.shape[1])
    if type(layer).__name__ == "Conv1D":  # GPT-2 style: weight (in, out)
        return int(w.shape[1]), int(w.shape[0])
    return None


def resolve_layers(model: Any, modules: dict[str, LoraModule], model_name: str
                   ) -> dict[str, Any]:
    """The model's layer for each adapter module, checked by name, type and shape."""
    out = {}
    for key, m in modules.items():
        if m.kind is not ModuleKind.LINEAR:
            raise UnsupportedVariantError(
                f"{m.kind.value} LoRA: regmean captures the inputs of linear layers only",
                key=key, hint="merge these adapters with a data-free method")
        try:
            layer = model.get_submodule(key)
        except AttributeError:
            raise ConfigMismatchError(
                "the model has no module of this name", path=model_name, key=key,
                hint="are the adapters for this model?") from None
        shape = layer_width(layer)
        if shape is None:
            raise UnsupportedVariantError(
                f"the model's module is a {type(layer).__name__}, not a linear layer", key=key,
                path=model_name)
        if shape != (m.out_features, m.in_features):
            raise ShapeMismatchError(
                f"the adapter's update is {(m.out_features, m.in_features)} but the model's "
                f"layer is {shape}", path=model_name, key=key,
                hint="are the adapters for this model?")
        out[key] = layer
    return out


class _Stop(Exception):
    """Raised by the last hooked layer of a pass: the rest of the forward is not needed."""


def _flat_tokens(x: torch.Tensor, mask: torch.Tensor, key: str) -> torch.Tensor:
    """``(tokens, in)`` rows of the layer input ``x`` at non-padding positions."""
    if x.ndim == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask]
    if x.ndim == 2 and x.shape[0] == mask.numel():
        return x[mask.reshape(-1)]
    raise UnsupportedVariantError(
        f"the layer input has shape {tuple(x.shape)}, which does not line up with the token "
        f"mask {tuple(mask.shape)}", key=key)


def _own_hooks(layers: dict[str, Any], modules: dict[str, LoraModule]) -> list[Any]:
    """Forward hooks adding ``scale * B (A x)`` to each adapted layer's output."""
    handles = []
    for key, m in modules.items():
        a = m.down_matrix(torch.float32)  # (r, in)
        b = m.up_matrix(torch.float32) * m.scale  # (out, r)

        def hook(_mod, args, out, a=a, b=b):
            x = args[0]
            return out + ((x.to(a.dtype) @ a.T) @ b.T).to(out.dtype)  # (..., out)

        handles.append(layers[key].register_forward_hook(hook))
    return handles


def _batches(tokenizer: Any, prompts: Sequence[str], batch_size: int, max_tokens: int):
    side = getattr(tokenizer, "padding_side", "right")
    tokenizer.padding_side = "right"
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[i:i + batch_size]), return_tensors="pt", padding=True,
                            truncation=True, max_length=max_tokens)
            yield enc["input_ids"], enc["attention_mask"].bool()  # (b, s) each
    finally:
        tokenizer.padding_side = side


def _run(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> None:
    try:
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask.long(), use_cache=False)
    except _Stop:
        pass


def probe_groups(model: Any, tokenizer: Any, layers: dict[str, Any], prompt: str
                 ) -> tuple[list[list[str]], bool]:
    """Groups of layers handed the same input tensor, in execution order, from one forward;
    and whether every layer ran exactly once (only then may a pass stop early)."""
    seen: list[tuple[str, torch.Tensor]] = []  # references keep the tensors (and addresses) alive
    calls: dict[str, int] = {}

    def make(key):
        def pre(_mod, args):
            calls[key] = calls.get(key, 0) + 1
            if calls[key] == 1:
                seen.append((key, args[0]))
        return pre

    handles = [layer.register_forward_pre_hook(make(k)) for k, layer in layers.items()]
    try:
        ids, mask = next(_batches(tokenizer, [prompt], 1, 64))
        _run(model, ids, mask)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    reps: list[torch.Tensor] = []
    for key, x in seen:
        j = next((i for i, r in enumerate(reps) if r is x), None)
        if j is None:
            groups.append([key])
            reps.append(x)
        else:
            groups[j].append(key)
    missed = sorted(set(layers) - set(calls))
    if missed:
        raise UnsupportedVariantError("the model's forward pass never runs this layer",
                                      key=missed[0])
    return groups, all(c == 1 for c in calls.values())


def plan_passes(groups: list[list[str]], widths: dict[str, int], budget_bytes: float
                ) -> list[list[list[str]]]:
    """Consecutive groups packed into passes whose float64 Grams fit ``budget_bytes``.

    Example:
        >>> [len(p) for p in plan_passes([["a"], ["b"], ["c"]], {"a": 10, "b": 10, "c": 10}, 1700)]
        [2, 1]
    """
    passes: list[list[list[str]]] = [[]]
    used = 0.0
    for g in groups:
        size = 8.0 * widths[g[0]] ** 2
        if passes[-1] and used + size > budget_bytes:
            passes.append([])
            used = 0.0
        passes[-1].append(g)
        used += size
    return passes


@dataclass(frozen=True)
class CaptureConfig:
    """How Grams are captured (part of the cache key except ``batch_size`` and ``memory_gb``)."""

    activations: Activations = Activations.BASE
    max_tokens: int = 256
    batch_size: int = 8
    memory_gb: float = 4.0


def capture_grams(model: Any, tokenizer: Any, layers: dict[str, Any], prompts: Sequence[str],
                  config: CaptureConfig, *, own: dict[str, LoraModule] | None = None,
                  spill: Path | None = None, plan: tuple[list[list[str]], bool] | None = None,
                  progress: Callable[[str], None] | None = None) -> GramSet:
    """Grams of every layer in ``layers`` on ``prompts`` (see the module docstring).

    ``own``: the adapter's modules whose updates run during the capture (``activations=own``).
    ``spill``: a folder the passes write their Grams to (required when they need more than one
    pass; with one pass and no folder the Grams stay in memory).
    """
    groups, once = plan or probe_groups(model, tokenizer, layers, prompts[0])
    widths = {k: layer_width(layer)[1] for k, layer in layers.items()}  # type: ignore[index]
    passes = plan_passes(groups, widths, config.memory_gb * 2**30)
    if len(passes) > 1 and spill is None:
        raise ValueError("several capture passes need a spill folder")
    handles = _own_hooks(layers, own) if own else []
    gs = GramSet({k: g[0] for g in groups for k in g}, 0)
    try:
        for n, chunk in enumerate(passes):
            grams = _capture_pass(model, tokenizer, layers, prompts, config, chunk, once, gs)
            if spill is None:
                gs.tensors.update(grams)
            else:
                from lorakit.io import write_safetensors

                path = spill / f"grams-{n:05d}.safetensors"
                write_safetensors(path, grams)
                gs.files.update({k: path for k in grams})
            del grams
            if progress is not None:
                progress(f"pass {n + 1}/{len(passes)}")
    finally:
        for h in handles:
            h.remove()
    return gs


def _capture_pass(model: Any, tokenizer: Any, layers: dict[str, Any], prompts: Sequence[str],
                  config: CaptureConfig, chunk: list[list[str]], once: bool, gs: GramSet
                  ) -> dict[str, torch.Tensor]:
    reps = [g[0] for g in chunk]
    grams = {k: torch.zeros(w, w, dtype=torch.float64)
             for k in reps for w in [layer_width(layers[k])[1]]}  # type: ignore[index]
    state: dict[str, torch.Tensor] = {}
    last = reps[-1]

    def make(key):
        def pre(_mod, args):
            x = _flat_tokens(args[0], state["mask"], key).to(torch.float64)  # (tokens, in)
            grams[key].addmm_(x.T, x)  # (in, in)
            if once and key == last:
                raise _Stop
        return pre

    handles = [layers[k].register_forward_pre_hook(make(k)) for k in reps]
    tokens = 0
    try:
        for ids, mask in _batches(tokenizer, prompts, config.batch_size, config.max_tokens):
            state["mask"] = mask
            _run(model, ids, mask)
            tokens += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
    gs.tokens = tokens
    return grams


def temp_spill() -> Path:
    """A private temporary folder for Grams that do not fit in memory (removed by the caller)."""
    return Path(tempfile.mkdtemp(prefix="lorakit-grams-"))


def remove_spill(folder: Path | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
