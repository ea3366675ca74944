"""Extract a LoRA from a full fine-tune: the low-rank part of ``tuned - base``, tensor by tensor.

Both checkpoints are safetensors, a single file or sharded with ``*.safetensors.index.json`` (a
folder holding either works). Tensors are read one key at a time through ``safe_open``, so peak
memory stays near the two largest tensors plus the growing low-rank output. Every 2-D weight
(and conv kernel, flattened) whose difference is nonzero becomes a LoRA module from a seeded
randomized SVD; the rank policy chooses its rank (non-fixed policies see the top
``max_rank`` singular values and the exact total energy ``||tuned - base||_F^2``). 1-D tensors
(norms, biases) and tensors whose shapes differ cannot be decomposed: they are listed in the
report and skipped, or saved verbatim as extras (``non_lora="save"``).

The result is a PEFT adapter (``rank_pattern`` where ranks differ) with ``alpha = rank``.

Example:
    >>> from lorakit.compress.extract import extract                              # doctest: +SKIP
    >>> adapter, report = extract("base_dir", "tuned_dir", RankPolicy.fixed(16))  # doctest: +SKIP
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.adapter import Adapter, LoraModule, ModuleKind
from lorakit.errors import ConfigMismatchError, CorruptFileError, InputNotFoundError
from lorakit.lowrank import RankPolicy, randomized_svd, resolve_device, select_rank


class NonLora(str, enum.Enum):
    """What to do with tensors that cannot be decomposed (norms, biases, reshaped tensors)."""

    SKIP = "skip"
    SAVE = "save"


@dataclass
class ExtractReport:
    """Per-module ranks and errors, and the tensors that were not decomposed."""

    modules: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)
    unchanged: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"modules": self.modules, "skipped": self.skipped, "saved": self.saved,
                "unchanged": self.unchanged}


class Checkpoint:
    """Key -> file map of a safetensors checkpoint (single file, sharded, or a folder)."""

    def __init__(self, path: str | Path) -> None:
        from lorakit.io import check_file, read_json, read_safetensors_header

        self.path = Path(path)
        if not self.path.exists():
            raise InputNotFoundError("no such file or folder", path=self.path)
        files = self._files()
        self.where: dict[str, Path] = {}
        for f in files:
            check_file(f)
            header, _ = read_safetensors_header(f)
            for k in header:
                self.where[k] = f
        index = next(iter(sorted(self._folder().glob("*.safetensors.index.json"))), None)
        if index is not None:
            mapping = read_json(index).get("weight_map", {})
            missing = [k for k in mapping if k not in self.where]
            if missing:
                raise CorruptFileError(f"index names {len(missing)} tensors missing from the "
                                       "shards", path=index, key=missing[0])
        if not self.where:
            raise InputNotFoundError("checkpoint holds no tensors", path=self.path)

    def _folder(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    def _files(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        index = sorted(self.path.glob("*.safetensors.index.json"))
        if index:
            mapping = json.loads(index[0].read_text()).get("weight_map", {})
            return sorted({self.path / f for f in mapping.values()})
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise InputNotFoundError("folder holds no *.safetensors checkpoint", path=self.path)
        return files

    def keys(self) -> list[str]:
        return list(self.where)

    def tensors(self, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield tensors one at a time (each file opened once, lazily)."""
        from safetensors import safe_open

        with ExitStack() as stack:
            handles: dict[Path, Any] = {}
            for k in keys:
                f = self.where[k]
                if f not in handles:
                    handles[f] = stack.enter_context(safe_open(str(f), "pt", device="cpu"))
                try:
                    yield k, handles[f].get_tensor(k)
                except Exception as e:  # the Rust reader's own error type
                    raise CorruptFileError(f"cannot read tensor ({e})", path=f, key=k) from e


def _module_key(key: str) -> str:
    return key[: -len(".weight")] if key.endswith(".weight") else key


def _decompose(diff: torch.Tensor, policy: RankPolicy, max_rank: int, seed: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Randomized SVD of ``diff (out, in*k)`` truncated by the policy; returns U, S, Vh, energy."""
    m = diff.to(device=device, dtype=torch.float32)
    total = float(m.double().pow(2).sum())
    cap = policy.rank if policy.is_fixed else max_rank
    cap = max(1, min(int(cap or max_rank), *m.shape))
    u, s, vh = randomized_svd(m, cap, seed=seed)
    s64 = s.double().cpu()
    if policy.kind.value in ("energy", "sv_fro"):
        # the tail beyond the computed triplets counts in the total energy
        rest = max(total - float(s64.pow(2).sum()), 0.0)
        padded = torch.cat([s64, torch.tensor([rest ** 0.5])]) if rest > 0 else s64
        k = min(select_rank(padded, policy), s64.numel())
    else:
        k = select_rank(s64, policy)
    return u[:, :k], s[:k], vh[:k], total


def extract(base: str | Path, tuned: str | Path, policy: RankPolicy, *, max_rank: int = 256,
            non_lora: NonLora | str = NonLora.SKIP, seed: int = 0, device: str = "auto",
            dtype: torch.dtype | None = None, progress: Callable[[str], None] | None = None,
            ) -> tuple[Adapter, ExtractReport]:
    """A LoRA approximating ``tuned - base``; see the module docstring.

    Example:
        >>> a, rep = extract("base.safetensors", "tuned.safetensors",
        ...                  RankPolicy.from_options(energy=0.9))            # doctest: +SKIP
    """
    non_lora = NonLora(non_lora)
    b_ck, t_ck = Checkpoint(base), Checkpoint(tuned)
    dev = resolve_device(device)
    missing = [k for k in t_ck.keys() if k not in b_ck.where]
    if missing:
        raise ConfigMismatchError(f"{len(missing)} tuned tensors are not in the base checkpoint",
                                  path=tuned, key=missing[0],
                                  hint="are these checkpoints of the same model?")
    report = ExtractReport()
    modules: dict[str, LoraModule] = {}
    extras: dict[str, torch.Tensor] = {}
    keys = t_ck.keys()
    base_iter = b_ck.tensors(keys)
    for (key, t), (_, b) in zip(t_ck.tensors(keys), base_iter, strict=True):
        if progress:
            progress(key)
        if t.shape != b.shape or t.ndim not in (2, 4) or not t.is_floating_point():
            why = "shape differs from base" if t.shape != b.shape else f"{t.ndim}-D tensor"
            if non_lora is NonLora.SAVE:
                extras[key] = t.clone()
                report.saved.append(key)
            else:
                report.skipped.append({"key": key, "reason": why})
            continue
        diff = (t.float() - b.float()).reshape(t.shape[0], -1)  # (out, in*k)
        del t
        if not bool(diff.any()):
            report.unchanged += 1
            continue
        u, s, vh, total = _decompose(diff, policy, max_rank, seed, dev)
        k = int(s.numel())
        root = s.clamp_min(0).sqrt()
        out_dtype = dtype or b.dtype
        up = (u * root).cpu().to(out_dtype)  # (out, k)
        down = (root[:, None] * vh).cpu().to(out_dtype)  # (k, in*kh*kw)
        kind = ModuleKind.LINEAR
        if b.ndim == 4:
            kind = ModuleKind.CONV
            up, down = up.reshape(-1, k, 1, 1), down.reshape(k, *b.shape[1:])
        modules[_module_key(key)] = LoraModule(down=down.contiguous(), up=up.contiguous(),
                                               alpha=float(k), kind=kind)
        kept = float(s.double().pow(2).sum())
        report.modules.append({"key": _module_key(key), "rank": k,
                               "energy_kept": kept / total if total else 1.0,
                               "rel_error": (max(total - kept, 0.0) / total) ** 0.5
                               if total else 0.0})
        del diff, b
    if not modules:
        raise ConfigMismatchError("base and tuned checkpoints do not differ in any 2-D weight",
                                  path=tuned)
    adapter = Adapter(modules=modules, extras=extras, base_model=str(base), source=str(tuned),
                      config={"task_type": None})
    return adapter, report
