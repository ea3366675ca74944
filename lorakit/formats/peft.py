"""PEFT adapters: a folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``).

Reading:
    * keys ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (``.weight`` optional, as
      older and AdaLoRA files omit it), ``lora_B.bias`` (``lora_bias``), ``lora_embedding_A/B``,
      ``lora_magnitude_vector[.weight]`` (DoRA). Everything else is an extra tensor, kept verbatim.
    * per-module rank and alpha: ``rank_pattern`` / ``alpha_pattern`` are resolved for each module
      by exact key first, then by PEFT's regex rule ``(.*\\.)?(pattern)$`` in pattern order, then
      ``r`` / ``lora_alpha``. The rank found in the tensors must agree with the config.
    * AdaLoRA (``peft_type: ADALORA``, ``lora_E``) is folded into an equivalent LoRA:
      ``A <- E * A`` and ``alpha <- scaling * r / (r + 1e-5)`` with ``scaling = lora_alpha``
      (``r`` if ``lora_alpha <= 0``) and ``r`` the saved rank, which reproduces PEFT's AdaLoRA
      forward ``B (A * E) scaling / (ranknum + 1e-5)``. It is written back as a plain LoRA.
    * ``.bin`` weights are read with ``torch.load(weights_only=True)`` only.

Writing: ``base_model.model.`` keys, ``adapter_config.json`` (the original config when the ranks,
alphas and targets it implies still hold, else one updated with ``rank_pattern`` /
``alpha_pattern`` using exact module paths), and a README model card recording provenance.

Example:
    >>> from lorakit.formats.peft import load_peft  # doctest: +SKIP
    >>> load_peft("adapters/my_lora").ranks()        # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from lorakit.adapter import Adapter, LoraModule, ModuleKind
from lorakit.errors import (
    ConfigMismatchError,
    InputNotFoundError,
    UnknownLayoutError,
    UnsupportedVariantError,
)
from lorakit.formats.common import (
    build_modules,
    cast,
    check_variants,
    common_value,
    exact_patterns,
    number,
    target_name,
)
from lorakit.formats.dora import peft_magnitude
from lorakit.io import read_json, read_pickle, read_safetensors, write_safetensors
from lorakit.values import check_peft_config, check_scale

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."

# (suffix, role) in matching order; roles: down, up, bias, magnitude, e, emb_down, emb_up
_ROLES: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", "down"), (".lora_A", "down"),
    (".lora_B.weight", "up"), (".lora_B", "up"),
    (".lora_B.bias", "bias"),
    (".lora_embedding_A", "emb_down"), (".lora_embedding_B", "emb_up"),
    (".lora_magnitude_vector.weight", "magnitude"), (".lora_magnitude_vector", "magnitude"),
    (".lora_E", "e"),
)


def find_weights(folder: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise InputNotFoundError(
        f"no adapter weights found (looked for {', '.join(WEIGHT_NAMES)})", path=folder)


def pattern_value(patterns: dict[str, Any] | None, key: str, default: Any, *,
                  path: Path | str, field: str) -> Any:
    """Resolve a PEFT ``rank_pattern``/``alpha_pattern`` entry for one module key.

    Example:
        >>> pattern_value({"q_proj": 8}, "model.layers.0.self_attn.q_proj", 4, path="", field="")
        8
    """
    if not patterns:
        return default
    if not isinstance(patterns, dict):
        raise ConfigMismatchError(f"{field} must map module patterns to values, got "
                                  f"{type(patterns).__name__}", path=path, key=key)
    if key in patterns:
        return patterns[key]
    for pat in patterns:
        try:
            if re.match(rf"(.*\.)?({pat})$", key):
                return patterns[pat]
        except re.error as e:
            raise ConfigMismatchError(f"{field} entry {pat!r} is not a valid regex ({e})",
                                      path=path, key=key) from e
    return default


def _split_key(k: str) -> tuple[str, str | None]:
    body = k[len(PREFIX):] if k.startswith(PREFIX) else k
    for suffix, role in _ROLES:
        if body.endswith(suffix):
            return body[: -len(suffix)], role
    return body, None


def _group(tensors: dict[str, torch.Tensor], path: Path,
           unknown: list[str] | None = None) -> tuple[dict, dict, dict]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    extras: dict[str, torch.Tensor] = {}
    e_vectors: dict[str, torch.Tensor] = {}
    check_variants(list(tensors), path)
    for k, t in tensors.items():
        mod, role = _split_key(k)
        if role is None:
            if ".lora_" in k or k.startswith("lora_"):
                if unknown is not None:  # accounted for by the caller (--ignore-unknown)
                    unknown.append(k)
                    continue
                raise UnknownLayoutError("LoRA-like key in no layout lorakit knows", path=path,
                                         key=k)
            extras[mod] = t
            continue
        if not mod:
            raise UnknownLayoutError("LoRA key without a module path", path=path, key=k)
        if role == "e":
            e_vectors[mod] = t
            continue
        slot = {"emb_down": "down", "emb_up": "up"}.get(role, role)
        p = parts.setdefault(mod, {})
        if slot in p:
            raise ConfigMismatchError(f"two tensors give this module's {slot}", path=path, key=k)
        p[slot] = t
        if role.startswith("emb_"):
            p["embedding"] = t
    return parts, extras, e_vectors


def load_peft(path: str | Path, unknown: list[str] | None = None) -> Adapter:
    """Load a PEFT adapter folder (or its weights file with the config beside it).

    Example:
        >>> a = load_peft("../shared/real_adapters/gpt2_r4_jhess")   # doctest: +SKIP
        >>> a.modules["transformer.h.0.attn.c_attn"].scale            # doctest: +SKIP
        4.0
    """
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError("no such file or folder", path=path)
    folder = path if path.is_dir() else path.parent
    cfg_path = folder / CONFIG_NAME
    config = read_json(cfg_path)
    check_peft_config(config, cfg_path)  # field types and values, named (lorakit.values)
    weights = find_weights(folder) if path.is_dir() else path
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type not in ("LORA", "ADALORA"):
        raise UnsupportedVariantError(f"peft_type {peft_type} is not a LoRA", path=cfg_path,
                                      key="peft_type")
    if weights.suffix == ".safetensors":
        tensors, meta = read_safetensors(weights)
    else:
        tensors, meta = read_pickle(weights), {}
    if not tensors:
        raise InputNotFoundError("weights file holds no tensors", path=weights)
    parts, extras, e_vectors = _group(tensors, weights, unknown)
    if not parts:
        raise ConfigMismatchError("no LoRA tensors (lora_A/lora_B) in the weights file",
                                  path=weights)
    if peft_type == "ADALORA":
        alphas = _fold_adalora(parts, e_vectors, config, weights)
    else:
        if e_vectors:
            raise ConfigMismatchError("lora_E tensors in a LORA adapter (AdaLoRA weights?)",
                                      path=weights, key=next(iter(e_vectors)))
        alphas = _alphas_from_config(parts, config, cfg_path)
    rslora = bool(config.get("use_rslora") or False)
    modules = build_modules(parts, alphas, weights, rslora=rslora)
    _check_dora(modules, config, cfg_path)
    return Adapter(modules=modules, extras=extras,
                   base_model=_base_model(config), source_format="peft",
                   layout="peft_adalora" if peft_type == "ADALORA" else "peft", config=config,
                   metadata=dict(meta), source=str(path))


def _base_model(config: dict) -> str | None:
    """``base_model_name_or_path`` as a string (a config may hold a non-string value)."""
    base = config.get("base_model_name_or_path")
    return None if base is None else str(base)


def _alphas_from_config(parts: dict, config: dict, cfg_path: Path) -> dict[str, float]:
    r_default, a_default = config.get("r", 8), config.get("lora_alpha", 8)
    rp, ap = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    alphas: dict[str, float] = {}
    for key, p in parts.items():
        r_cfg = pattern_value(rp, key, r_default, path=cfg_path, field="rank_pattern")
        if isinstance(r_cfg, bool) or not isinstance(r_cfg, (int, float)) or r_cfg != int(r_cfg):
            raise ConfigMismatchError(f"r must be an integer, got {r_cfg!r}", path=cfg_path,
                                      key=key)
        if "down" in p and p["down"].ndim >= 1 and int(p["down"].shape[0]) != int(r_cfg):
            raise ConfigMismatchError(
                f"config gives rank {r_cfg} but lora_A has rank {int(p['down'].shape[0])}",
                path=cfg_path, key=key, hint="the config does not belong to these weights")
        alpha = pattern_value(ap, key, None, path=cfg_path, field="alpha_pattern")
        field = "lora_alpha" if alpha is None else "alpha_pattern"
        alpha = a_default if alpha is None else alpha
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) \
                or not math.isfinite(alpha):
            raise ConfigMismatchError(f"lora_alpha must be a number, got {alpha!r}",
                                      path=cfg_path, key=key)
        why = check_scale(float(alpha), int(r_cfg), bool(config.get("use_rslora")))
        if why:
            raise ConfigMismatchError(f"{field}: {why}", path=cfg_path, key=key)
        alphas[key] = float(alpha)
    return alphas


def _fold_adalora(parts: dict, e_vectors: dict, config: dict, path: Path) -> dict[str, float]:
    lora_alpha = float(config.get("lora_alpha") or 0)
    alphas: dict[str, float] = {}
    for key, p in parts.items():
        e = e_vectors.get(key)
        down = p.get("down")
        if e is None or down is None:
            raise ConfigMismatchError("AdaLoRA module without lora_E or lora_A", path=path, key=key)
        r = int(down.shape[0])
        if down.ndim != 2 or tuple(e.shape) not in ((r, 1), (r,)):
            raise ConfigMismatchError(
                f"lora_E has shape {tuple(e.shape)}, expected ({r}, 1)", path=path, key=key)
        p["down"] = down * e.reshape(r, 1).to(down.dtype)  # (r, in): the E-weighted rows of A
        scaling = lora_alpha if lora_alpha > 0 else float(r)
        ranknum = float(torch.tensor(float(r), dtype=torch.float32) + 1e-5)
        alphas[key] = scaling * r / ranknum
    return alphas


def _check_dora(modules: dict[str, LoraModule], config: dict, cfg_path: Path) -> None:
    has_mag = [k for k, m in modules.items() if m.magnitude is not None]
    if config.get("use_dora") and len(has_mag) != len(modules):
        missing = next(k for k in modules if k not in has_mag)
        raise ConfigMismatchError("use_dora is true but the module has no magnitude vector",
                                  path=cfg_path, key=missing)
    if has_mag and not config.get("use_dora"):
        raise ConfigMismatchError("DoRA magnitude vectors found but use_dora is not set",
                                  path=cfg_path, key=has_mag[0])


# ----------------------------------------------------------------------------------- writing


def peft_tensors(adapter: Adapter, dtype: torch.dtype | None = None,
                 rslora_global: bool = False) -> dict[str, torch.Tensor]:
    """The state dict PEFT expects for ``adapter`` (keys with ``base_model.model.``)."""
    out: dict[str, torch.Tensor] = {}
    for key, m in adapter.modules.items():
        p = PREFIX + key
        if m.kind is ModuleKind.EMBEDDING:
            out[f"{p}.lora_embedding_A"] = cast(m.down, dtype)
            out[f"{p}.lora_embedding_B"] = cast(m.up, dtype)
        else:
            out[f"{p}.lora_A.weight"] = cast(m.down, dtype)
            out[f"{p}.lora_B.weight"] = cast(m.up, dtype)
        if m.bias is not None:
            out[f"{p}.lora_B.bias"] = cast(m.bias, dtype)
        if m.magnitude is not None:  # hook (issue 16b): PEFT's shape; wd_on_out=False refused
            out[f"{p}.lora_magnitude_vector.weight"] = cast(peft_magnitude(m, key), dtype)
    for key, t in adapter.extras.items():
        out[PREFIX + key] = t
    return out


def _peft_alpha(m: LoraModule, rslora_global: bool) -> float:
    """Alpha that gives ``m.scale`` under the config's global rsLoRA flag."""
    if m.rslora == rslora_global:
        return float(m.alpha)
    r = m.rank
    return m.scale * (math.sqrt(r) if rslora_global else r)


def _config_still_valid(config: dict, adapter: Adapter, rslora: bool) -> bool:
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        return False
    if bool(config.get("use_rslora") or False) != rslora:
        return False
    if bool(config.get("use_dora") or False) != adapter.is_dora:
        return False
    rp, ap = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    try:
        for key, m in adapter.modules.items():
            if int(pattern_value(rp, key, config.get("r"), path="", field="")) != m.rank:
                return False
            alpha = pattern_value(ap, key, config.get("lora_alpha"), path="", field="")
            if not isinstance(alpha, (int, float)) or float(alpha) != _peft_alpha(m, rslora):
                return False
    except (ConfigMismatchError, TypeError, ValueError):
        return False
    return True


def build_config(adapter: Adapter) -> dict[str, Any]:
    """The ``adapter_config.json`` for ``adapter``: the original when it still holds, else updated."""
    rslora = bool(adapter.modules) and all(m.rslora for m in adapter.modules.values())
    config = dict(adapter.config) if adapter.source_format in ("peft", "peftnative") else {}
    if config and _config_still_valid(config, adapter, rslora):
        return config
    ranks = {k: m.rank for k, m in adapter.modules.items()}
    alphas = {k: _peft_alpha(m, rslora) for k, m in adapter.modules.items()}
    r = common_value(list(ranks.values()), 8)
    alpha = common_value(list(alphas.values()), float(r))
    targets = sorted({target_name(k) for k in adapter.modules})
    base = config or {
        "peft_type": "LORA", "task_type": None, "inference_mode": True, "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "revision": None,
    }
    base = dict(base)
    if adapter.config.get("auto_mapping") and not base.get("auto_mapping"):
        base["auto_mapping"] = adapter.config["auto_mapping"]
    if str(base.get("peft_type", "LORA")).upper() == "ADALORA":
        for k in ("target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2",
                  "orth_reg_weight", "total_step"):
            base.pop(k, None)
    base.update({
        "peft_type": "LORA",
        "base_model_name_or_path": adapter.base_model,
        "r": int(r),
        "lora_alpha": number(alpha),
        "rank_pattern": exact_patterns(ranks, r),
        "alpha_pattern": {k: number(v) for k, v in exact_patterns(alphas, alpha).items()},
        "use_rslora": rslora,
        "use_dora": adapter.is_dora,
        "lora_bias": any(m.bias is not None for m in adapter.modules.values()),
    })
    if not config or not _targets_cover(base.get("target_modules"), adapter):
        base["target_modules"] = targets
    return base


def _targets_cover(targets: Any, adapter: Adapter) -> bool:
    if isinstance(targets, str):
        return all(re.fullmatch(targets, k) for k in adapter.modules)
    if isinstance(targets, list):
        return all(any(k == t or k.endswith("." + t) for t in targets) for k in adapter.modules)
    return False


def model_card(adapter: Adapter, provenance: dict[str, Any] | None) -> str:
    """A README.md model card with YAML front matter and what produced the adapter."""
    prov = provenance or {}
    lines = ["---"]
    if adapter.base_model:
        lines.append(f"base_model: {json.dumps(adapter.base_model)}")
    lines += ["library_name: peft", "tags:", "- lora", "- lorakit", "---", "",
              "# LoRA adapter", "", "Written by [lorakit](https://pypi.org/project/lorakit/).", ""]
    ranks = sorted(set(adapter.ranks().values()))
    lines.append(f"- modules: {len(adapter.modules)}; ranks: {ranks}")
    if prov.get("command"):
        lines.append(f"- command: `{prov['command']}`")
    for s in prov.get("sources", []):
        lines.append(f"- source: `{s}`")
    if prov.get("recipe"):
        lines += ["", "## Recipe", "", "```yaml", str(prov["recipe"]).rstrip(), "```"]
    return "\n".join(lines) + "\n"


def save_peft(adapter: Adapter, folder: Path, *, dtype: torch.dtype | None = None,
              provenance: dict[str, Any] | None = None) -> None:
    """Write ``adapter`` as a PEFT folder into ``folder`` (which must exist and be empty)."""
    if adapter.components():
        comps = adapter.components()
        raise ConfigMismatchError(
            f"a PEFT folder holds one model but this adapter spans components {comps}",
            path=folder, hint="pick one with --component (e.g. --component unet)")
    config = build_config(adapter)
    rslora = bool(config.get("use_rslora"))
    tensors = peft_tensors(adapter, dtype, rslora)
    meta = dict(adapter.metadata) if adapter.source_format in ("peft", "peftnative") else {}
    meta.setdefault("format", "pt")
    # write failures (disk full, shared storage between tensors) raise OutputWriteError
    write_safetensors(folder / WEIGHT_NAMES[0], tensors, meta)
    # top-level keys sorted; pattern dicts keep their order (PEFT matches patterns in order)
    (folder / CONFIG_NAME).write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")
    (folder / "README.md").write_text(model_card(adapter, provenance))
