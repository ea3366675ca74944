"""calibrate/: what calibrated merges (``regmean``) read from a model: input Grams per layer.

:func:`prepare_grams` turns (adapters, model, calibration prompts, optional cache folder) into
one :class:`GramSet` per adapter. The model is loaded once (through the ``transfer`` extra: a
model folder, a ``.gguf`` file or a Hub id, :mod:`lorakit.transfer.models`) and only if some
adapter's Grams are not already in the cache.

The cache (``--grams DIR``) holds one folder per adapter and calibration set,
``DIR/<adapter name>-<key>/`` with ``index.json`` and safetensors files; ``<key>`` is a hash of
what the Grams depend on: the model (its path, or Hub id, and its ``config.json``), the prompts,
``activations``, ``max_tokens``, the module names (and with ``activations=own`` the adapter's
factors). Merging again with other weights, ``shrink`` or rank policy reads it and runs no model.
A folder is written under a temporary name and renamed when complete.

Example:
    >>> sets, spill = prepare_grams(adapters, "model_dir", [["1 + 2 ="], ["France"]],
    ...                             None, CaptureConfig())               # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lorakit.adapter import Adapter, LoraModule
from lorakit.calibrate.data import Calibration, adapter_name, resolve_calibration
from lorakit.calibrate.grams import (
    Activations,
    CaptureConfig,
    GramSet,
    capture_grams,
    load_gram_set,
    probe_groups,
    remove_spill,
    resolve_layers,
    save_index,
    temp_spill,
)

ModelSpec = str | Path | tuple[Any, Any]


def model_identity(model: ModelSpec) -> str:
    """What a model's Grams are keyed by: resolved path (+ GGUF file, size, config) or Hub id."""
    if isinstance(model, tuple):
        m = model[0]
        cfg = getattr(m, "config", None)
        return json.dumps({"name": getattr(cfg, "_name_or_path", type(m).__name__),
                           "config": cfg.to_json_string() if cfg is not None else ""})
    from lorakit.transfer.models import ModelRef

    ref = ModelRef.parse(model)
    parts: dict[str, Any] = {"folder": ref.folder, "gguf": ref.gguf_file}
    folder = Path(ref.folder)
    if folder.is_dir():
        parts["folder"] = str(folder.resolve())
        cfg = folder / "config.json"
        if cfg.is_file():
            parts["config"] = hashlib.sha256(cfg.read_bytes()).hexdigest()
        if ref.gguf_file:
            parts["size"] = (folder / ref.gguf_file).stat().st_size
    return json.dumps(parts, sort_keys=True)


def _adapter_hash(modules: dict[str, LoraModule]) -> str:
    h = hashlib.sha256()
    for k in sorted(modules):
        m = modules[k]
        h.update(k.encode())
        h.update(repr(m.scale).encode())
        for t in (m.down, m.up):
            h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_key(model_id: str, prompts: Sequence[str], config: CaptureConfig, keys: Sequence[str],
              own: dict[str, LoraModule] | None) -> str:
    """The hash a Gram cache folder is named by (see the module docstring)."""
    payload = {"model": model_id, "prompts": list(prompts), "activations": config.activations.value,
               "max_tokens": config.max_tokens, "modules": sorted(keys),
               "adapter": _adapter_hash(own) if own is not None else None}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _load_model(model: ModelSpec) -> tuple[Any, Any, str]:
    if isinstance(model, tuple):
        m, tok = model
        return m, tok, getattr(getattr(m, "config", None), "_name_or_path", "model")
    from lorakit.transfer.models import load_causal_lm

    m, tok = load_causal_lm(model)
    return m, tok, str(model)


def prepare_grams(adapters: Sequence[Adapter], model: ModelSpec | None,
                  calibration: Calibration | None, grams: str | Path | None,
                  config: CaptureConfig, keys: Sequence[str], max_prompts: int | None = None,
                  progress: Callable[[str], None] | None = None
                  ) -> tuple[list[GramSet], Path | None]:
    """One :class:`GramSet` per adapter over the module ``keys`` (the union the merge needs),
    read from the ``grams`` cache or captured on ``model``. Returns the sets and a temporary
    spill folder to remove after the merge (None when nothing spilled).
    """
    from lorakit.errors import OptionError

    if model is None:
        raise OptionError("regmean needs the base model: --model DIR|FILE.gguf|ORG/NAME",
                          key="model")
    names = [adapter_name(a.source, i) for i, a in enumerate(adapters)]
    prompt_sets = resolve_calibration(calibration, names)
    if max_prompts is not None:
        prompt_sets = [p[:max_prompts] for p in prompt_sets]
    own = config.activations is Activations.OWN
    union = _union_modules(adapters, keys)
    mid = model_identity(model)
    cache = Path(grams) if grams is not None else None
    sets: list[GramSet | None] = []
    folders: list[Path | None] = []
    for i, (a, prompts) in enumerate(zip(adapters, prompt_sets, strict=True)):
        key = cache_key(mid, prompts, config, list(union), a.modules if own else None)
        folder = cache / f"{names[i]}-{key}" if cache is not None else None
        folders.append(folder)
        sets.append(load_gram_set(folder) if folder is not None else None)
    todo = [i for i, s in enumerate(sets) if s is None]
    holder: list[Path] = []
    if todo:
        try:
            _capture_missing(adapters, model, prompt_sets, config, union, todo, folders, sets,
                             holder, progress)
        except BaseException:
            remove_spill(holder[0] if holder else None)  # no temporary Grams left behind
            raise
    return [s for s in sets if s is not None], (holder[0] if holder else None)


def _union_modules(adapters: Sequence[Adapter], keys: Sequence[str]) -> dict[str, LoraModule]:
    out: dict[str, LoraModule] = {}
    for k in keys:
        out[k] = next(a.modules[k] for a in adapters if k in a.modules)
    return out


def _capture_missing(adapters, model, prompt_sets, config, union, todo, folders, sets, holder,
                     progress) -> None:
    """Capture the Grams of the adapters ``todo`` (one model load); ``holder`` receives the
    temporary spill folder if one is made."""
    m, tok, name = _load_model(model)
    layers = resolve_layers(m, union, name)
    for i in todo:  # the adapter's own modules must fit the model too
        resolve_layers(m, adapters[i].modules, name)
    plan = probe_groups(m, tok, layers, prompt_sets[todo[0]][0])
    total = sum(8.0 * layer_in(layers[g[0]]) ** 2 for g in plan[0])
    many = total > config.memory_gb * 2**30
    for i in todo:
        folder = folders[i]
        tmp = None
        if folder is not None:
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(_mkdtemp(folder))
        elif many:
            if not holder:
                holder.append(temp_spill())
            tmp = holder[0] / f"{i}"
            tmp.mkdir()
        try:
            own = adapters[i].modules if config.activations is Activations.OWN else None
            gs = capture_grams(m, tok, layers, prompt_sets[i], config, own=own,
                               spill=tmp if (many or folder is not None) else None, plan=plan,
                               progress=progress)
            if folder is not None and tmp is not None:
                if not gs.files:  # one pass in memory: write it as one file
                    from lorakit.io import write_safetensors

                    path = tmp / "grams-00000.safetensors"
                    write_safetensors(path, gs.tensors)
                    gs.files = {k: path for k in gs.tensors}
                save_index(tmp, gs, {"adapter": adapters[i].source, "prompts":
                                     len(prompt_sets[i]), "activations": config.activations.value})
                _publish(tmp, folder)
                gs = load_gram_set(folder)
        except BaseException:
            if folder is not None and tmp is not None:
                remove_spill(tmp)
            raise
        sets[i] = gs
        if progress is not None:
            progress(f"grams {i + 1}/{len(adapters)}")


def _publish(tmp: Path, folder: Path) -> None:
    """Rename a finished capture into place; if another run finished the same folder first,
    keep that one (same key, same Grams) and drop ours."""
    try:
        os.replace(tmp, folder)
    except OSError:
        if load_gram_set(folder) is None:
            raise
        remove_spill(tmp)


def layer_in(layer: Any) -> int:
    from lorakit.calibrate.grams import layer_width

    w = layer_width(layer)
    return 0 if w is None else w[1]


def _mkdtemp(folder: Path) -> str:
    import tempfile

    return tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent)


__all__ = ["Activations", "CaptureConfig", "GramSet", "prepare_grams", "capture_grams",
           "resolve_calibration", "cache_key", "remove_spill"]
