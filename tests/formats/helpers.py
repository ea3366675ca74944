"""Small builders for synthetic adapter files used by the format unit tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def write_peft(folder: Path, config: dict, tensors: dict[str, torch.Tensor], *,
               bin_file: bool = False) -> Path:
    """A PEFT folder with ``adapter_config.json`` and safetensors (or pickled ``.bin``) weights."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ["q_proj"]}
    cfg.update(config)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    if bin_file:
        torch.save(tensors, folder / "adapter_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in tensors.items()},
                  str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def write_st(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def peft_pair(key: str, r: int, din: int, dout: int, seed: int) -> dict[str, torch.Tensor]:
    p = f"base_model.model.{key}"
    return {f"{p}.lora_A.weight": randn(r, din, seed=seed),
            f"{p}.lora_B.weight": randn(dout, r, seed=seed + 1000)}


def kohya_pair(name: str, r: int, din: int, dout: int, seed: int,
               alpha: float | None = None, dtype=torch.float32) -> dict[str, torch.Tensor]:
    out = {f"{name}.lora_down.weight": randn(r, din, seed=seed, dtype=dtype),
           f"{name}.lora_up.weight": randn(dout, r, seed=seed + 1000, dtype=dtype)}
    if alpha is not None:
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return out


def read_keys(path: Path) -> tuple[set[str], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return set(f.keys()), dict(f.metadata() or {})  # noqa: SIM118


def read_config(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def assert_unknown_key_named(tmp_path: Path, tensors: dict[str, torch.Tensor], bad: str,
                             clean) -> None:
    """``tensors`` plus the unknown key ``bad`` is refused naming it; ``--ignore-unknown`` lists
    it (inspect) and loads the modules of ``clean`` (the file without it)."""
    import pytest
    from click.testing import CliRunner

    import lorakit
    from lorakit.cli import cli
    from lorakit.errors import UnknownLayoutError

    path = write_st(tmp_path / "bad.safetensors", {**tensors, bad: randn(2, 2)})
    with pytest.raises(UnknownLayoutError) as info:
        lorakit.load(path)
    assert info.value.key == bad and "--ignore-unknown" in str(info.value)
    res = CliRunner().invoke(cli, ["inspect", str(path), "--ignore-unknown", "--no-spectra"])
    assert res.exit_code == 0 and f"ignored 1 unknown key(s): {bad}" in res.output, res.output
    assert sorted(lorakit.load(path, ignore_unknown=True).modules) == sorted(clean.modules)
