"""An independent reader for adapter files, used as the reference in the format tests.

It reads tensors with ``safetensors`` / ``torch.load`` and configs with ``json`` directly, and knows
each layout only as far as the tests need: it never calls lorakit. Modules come out keyed by
:func:`norm_key` (the module path with every ``.`` replaced by ``_`` and the component spelled out),
so kohya names compare with dotted paths without lorakit's name-mapping guess.

Each module is ``(up (out, r), down (r, in*k), scale)`` as float64 numpy arrays, with AdaLoRA's
``lora_E`` folded into ``down`` the way PEFT's forward applies it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

PEFT_PREFIX = "base_model.model."
_KOHYA_PREFIXES = (("lora_unet_unet_", "unet_"), ("lora_unet_", "unet_"),
                   ("lora_te1_", "text_encoder_"), ("lora_te2_", "text_encoder_2_"),
                   ("lora_te_", "text_encoder_"), ("lora_", ""))


@dataclass
class RawModule:
    up: np.ndarray  # (out, r)
    down: np.ndarray  # (r, in * kh * kw)
    scale: float
    shape: tuple[int, ...]  # delta shape as the file gives it

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, dtype=np.float64) -> np.ndarray:
        """``scale * B @ A`` as a matrix ``(out, in * k)`` (the scale is applied to B first)."""
        up = (self.scale * self.up).astype(dtype, copy=False)
        return up @ self.down.astype(dtype, copy=False)


def norm_key(key: str) -> str:
    """Module path with ``.`` -> ``_`` (comparable with kohya names)."""
    return key.replace(".", "_")


def read_tensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if file.suffix == ".safetensors":
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    return torch.load(str(file), map_location="cpu", weights_only=True), {}


def resolve(patterns: dict | None, key: str, default):
    """rank_pattern / alpha_pattern lookup: exact key, then ``(.*\\.)?(pattern)$`` in order."""
    patterns = patterns or {}
    if key in patterns:
        return patterns[key]
    for pat, value in patterns.items():
        if re.match(rf"(.*\.)?({pat})$", key):
            return value
    return default


def peft_rule(patterns: dict | None, key: str, default):
    """PEFT's own ``get_pattern_key`` rule (regex in order, no exact-key priority)."""
    for pat, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pat})$", key):
            return value
    return default


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def _module(up: torch.Tensor, down: torch.Tensor, scale: float) -> RawModule:
    r = down.shape[0]
    shape = (up.shape[0], *down.shape[1:])
    return RawModule(_np(up).reshape(up.shape[0], r), _np(down).reshape(r, -1), scale, shape)


def read_peft(folder: Path) -> dict[str, RawModule]:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    file = folder / "adapter_model.safetensors"
    if not file.exists():
        file = folder / "adapter_model.bin"
    tensors, _ = read_tensors(file)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    pat = re.compile(r"^(?P<mod>.+)\.(?P<role>lora_A|lora_B|lora_E|lora_embedding_A|"
                     r"lora_embedding_B)(?:\.weight)?$")
    for k, t in tensors.items():
        m = pat.match(k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k)
        if m:
            groups.setdefault(m["mod"], {})[m["role"].replace("embedding_", "")] = t
    adalora = str(cfg.get("peft_type", "LORA")).upper() == "ADALORA"
    out = {}
    for mod, g in groups.items():
        down, up = g["lora_A"], g["lora_B"]
        r = down.shape[0]
        lora_alpha = resolve(cfg.get("alpha_pattern"), mod, cfg.get("lora_alpha", 8))
        if adalora:
            # PEFT AdaLoRA forward: B @ (A * E) * scaling / (ranknum + 1e-5), ranknum a float32
            # buffer holding the saved rank.
            down = down * g["lora_E"].reshape(r, 1)
            scaling = lora_alpha if lora_alpha > 0 else r
            scale = scaling / float(np.float32(r) + np.float32(1e-5))
        else:
            assert r == resolve(cfg.get("rank_pattern"), mod, cfg.get("r", 8)), mod
            scale = lora_alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
        out[norm_key(mod)] = _module(up, down, scale)
    return out


_DIFF_PATTERNS = (
    re.compile(r"^(?P<mod>.+)\.processor\.(?P<proj>[a-z_]+?)_lora\.(?P<role>down|up)\.weight$"),
    re.compile(r"^(?P<mod>.+)\.(?:lora|lora_linear_layer)\.(?P<role>down|up)\.weight$"),
    re.compile(r"^(?P<mod>.+)\.lora_(?P<role>A|B)\.weight$"),
)


def read_diffusers(file: Path) -> dict[str, RawModule]:
    tensors, meta = read_tensors(file)
    cfg = json.loads(meta.get("lora_adapter_metadata") or "{}")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    for k, t in tensors.items():
        if k.endswith(".alpha"):
            alphas[k[: -len(".alpha")]] = float(t.double())
            continue
        for i, p in enumerate(_DIFF_PATTERNS):
            if m := p.match(k):
                mod = m["mod"]
                if i == 0:  # legacy attention processor: UNet implied, to_out_lora is to_out.0
                    proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
                    mod = f"unet.{mod}.{proj}"
                role = {"A": "down", "B": "up"}.get(m["role"], m["role"])
                groups.setdefault(mod, {})[role] = t
                break
    out = {}
    for mod, g in groups.items():
        r = g["down"].shape[0]
        alpha = alphas.get(mod)
        if alpha is None and cfg:
            comp, _, rest = mod.partition(".")
            if f"{comp}.lora_alpha" in cfg:
                assert r == resolve(cfg.get(f"{comp}.rank_pattern"), rest, cfg[f"{comp}.r"])
                alpha = resolve(cfg.get(f"{comp}.alpha_pattern"), rest, cfg[f"{comp}.lora_alpha"])
            elif "lora_alpha" in cfg:
                alpha = resolve(cfg.get("alpha_pattern"), mod, cfg["lora_alpha"])
        alpha = float(r if alpha is None else alpha)
        rs = any(k.endswith("use_rslora") and v is True for k, v in cfg.items())
        out[norm_key(mod)] = _module(g["up"], g["down"], alpha / (math.sqrt(r) if rs else r))
    return out


_KOHYA = re.compile(r"^(?P<name>lora_\w+?)[._](?P<role>lora_down\.weight|lora_up\.weight|alpha)$")


def read_kohya(file: Path) -> dict[str, RawModule]:
    tensors, _ = read_tensors(file)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in tensors.items():
        m = _KOHYA.match(k)
        assert m, k
        groups.setdefault(m["name"], {})[m["role"].split(".")[0]] = t
    out = {}
    for name, g in groups.items():
        key = next(new + name[len(old):] for old, new in _KOHYA_PREFIXES if name.startswith(old))
        r = g["lora_down"].shape[0]
        alpha = float(g["alpha"].double()) if "alpha" in g else float(r)
        out[key] = _module(g["lora_up"], g["lora_down"], alpha / r)
    return out


def read_any(path: Path) -> dict[str, RawModule]:
    """Reference modules of a PEFT folder, or a diffusers / kohya file (or folder with one)."""
    path = Path(path)
    if path.is_dir() and (path / "adapter_config.json").exists():
        return read_peft(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        assert len(files) == 1, files
        path = files[0]
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    if any(k.startswith("lora_") and ("lora_down" in k or k.endswith("alpha")) for k in keys):
        return read_kohya(path)
    return read_diffusers(path)


def strip_component(raw: dict[str, RawModule], component: str) -> dict[str, RawModule]:
    """Drop a ``<component>_`` prefix from every key (diffusers/kohya -> PEFT comparison)."""
    pre = component + "_"
    assert all(k.startswith(pre) for k in raw), list(raw)[:3]
    return {k[len(pre):]: m for k, m in raw.items()}


def rel_err(x: np.ndarray, ref: np.ndarray) -> float:
    """``||x - ref|| / ||ref||`` (absolute error when ``ref`` is all zero)."""
    n = float(np.linalg.norm(ref))
    diff = np.subtract(x, ref, dtype=np.float64)
    d = float(np.linalg.norm(diff))
    return d / n if n > 0 else d


def max_delta_error(got: dict[str, RawModule], ref: dict[str, RawModule],
                    dtype=np.float64) -> float:
    """Largest relative delta error over modules; keys must be identical."""
    assert set(got) == set(ref), (sorted(set(got) ^ set(ref)))[:6]
    return max(rel_err(got[k].delta(dtype), ref[k].delta(dtype)) for k in ref)


def module_delta(m, dtype=np.float64) -> np.ndarray:
    """``scale * B @ A`` of a lorakit LoraModule, computed here from its raw factors and alpha."""
    r = m.down.shape[0]
    scale = float(m.alpha) / (math.sqrt(r) if m.rslora else r)
    b = m.up.detach().to(torch.float64).numpy().reshape(m.up.shape[0], r)
    a = m.down.detach().to(torch.float64).numpy().reshape(r, -1)
    return (scale * b).astype(dtype, copy=False) @ a.astype(dtype, copy=False)
