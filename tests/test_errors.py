"""Bad input gets a named LorakitError; outputs are atomic, need --force, and never replace inputs.

One test per named error case. Each asserts the exception class and that ``str(error)`` names the
file and the problem (and the key where there is one), on one line. The bad inputs are built in
``tmp_path`` from small synthetic adapters and from copies of the real adapters in
``../shared/real_adapters`` (copied before mutating; the originals are only read).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import require_real
from safetensors.torch import load_file, save_file

import lorakit
import lorakit.io
from lorakit.cli import main
from lorakit.errors import (
    ConfigMismatchError,
    CorruptFileError,
    InputNotFoundError,
    LfsPointerError,
    LorakitError,
    NonFiniteError,
    OutputExistsError,
    OutputWriteError,
    ShapeMismatchError,
    UnknownLayoutError,
    UnsupportedVariantError,
)

KOHYA = "lora_unet_mid_block_attentions_0_proj_in"
KOHYA_KEY = "unet.mid_block.attentions.0.proj_in"  # the module key lorakit gives it
PEFT_MOD = "model.layers.0.self_attn.q_proj"
PEFT_A = f"base_model.model.{PEFT_MOD}.lora_A.weight"
PEFT_B = f"base_model.model.{PEFT_MOD}.lora_B.weight"
REAL_PEFT = "gpt2_r4_jhess"  # a small real PEFT adapter (r=4, GPT-2 Conv1D layers)
LFS_POINTER = ("version https://git-lfs.github.com/spec/v1\n"
               "oid sha256:19cd2ab6ca11de8c7cd9b25d44f2fbb793a418acadbf5bd7f76a160999fd473d\n"
               "size 1192672\n")


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def kohya_tensors(rank: int = 4, alpha: float | None = 4.0) -> dict[str, torch.Tensor]:
    out = {f"{KOHYA}.lora_down.weight": rand(rank, 8, seed=1),
           f"{KOHYA}.lora_up.weight": rand(6, rank, seed=2)}
    if alpha is not None:
        out[f"{KOHYA}.alpha"] = torch.tensor(alpha)
    return out


def write_kohya(path: Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    save_file(kohya_tensors() if tensors is None else tensors, str(path),
              metadata={"ss_network_module": "networks.lora"})
    return path


def peft_tensors(rank: int = 4) -> dict[str, torch.Tensor]:
    return {PEFT_A: rand(rank, 8, seed=3), PEFT_B: rand(8, rank, seed=4)}


def write_peft(folder: Path, config: dict | None = None,
               tensors: dict[str, torch.Tensor] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    cfg.update(config or {})
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(peft_tensors() if tensors is None else tensors,
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def copy_real(name: str, tmp_path: Path) -> Path:
    """A copy of a real adapter folder in tmp_path (skips when the real adapters are absent)."""
    dst = tmp_path / name
    shutil.copytree(require_real(name), dst)
    for p in dst.rglob("*"):  # the copy is ours to mutate even if the originals are read-only
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


def load_error(path: Path, cls: type[LorakitError]) -> LorakitError:
    with pytest.raises(LorakitError) as info:
        lorakit.load(path)
    assert type(info.value) is cls, f"expected {cls.__name__}, got {info.value!r}"
    return info.value


def assert_names(err: LorakitError, path: Path, *problem: str, key: str | None = None) -> None:
    """``str(err)`` is one line naming the file, each word of the problem, and the key."""
    msg = str(err)
    assert "\n" not in msg, msg
    assert str(path) in msg and err.path == str(path), (msg, err.path)
    for word in problem:
        assert word.lower() in msg.lower(), f"{word!r} not in {msg!r}"
    if key is not None:
        assert err.key == key and repr(key) in msg, (msg, err.key)


def header_len(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def _rewrite(p: Path, edit) -> None:
    """Rewrite ``p``'s header through ``edit(header) -> header`` and keep its data bytes."""
    raw = p.read_bytes()
    n = header_len(p)
    blob = json.dumps(edit(json.loads(raw[8:8 + n]))).encode()
    p.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


# ------------------------------------------------------------------------ missing or empty paths


def test_missing_path(tmp_path):
    p = tmp_path / "nope" / "adapter.safetensors"
    assert_names(load_error(p, InputNotFoundError), p, "no such file")


def test_empty_file(tmp_path):
    p = tmp_path / "lora.safetensors"
    p.write_bytes(b"")
    assert_names(load_error(p, InputNotFoundError), p, "empty")


def test_empty_config_file(tmp_path):
    folder = write_peft(tmp_path / "a")
    (folder / "adapter_config.json").write_bytes(b"")
    assert_names(load_error(folder, InputNotFoundError), folder / "adapter_config.json", "empty")


def test_empty_folder(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    assert_names(load_error(folder, InputNotFoundError), folder, "no adapter files")


def test_safetensors_without_tensors(tmp_path):
    p = tmp_path / "lora.safetensors"
    save_file({}, str(p), metadata={"format": "pt"})
    assert_names(load_error(p, InputNotFoundError), p, "no tensors")


# ------------------------------------------------------------------------ Git LFS pointers


def test_lfs_pointer_file(tmp_path):
    p = tmp_path / "lora.safetensors"
    p.write_text(LFS_POINTER)
    err = load_error(p, LfsPointerError)
    assert_names(err, p, "Git LFS pointer", "1,192,672-byte")
    assert "git lfs pull" in str(err)


def test_lfs_pointer_in_peft_folder(tmp_path):
    folder = write_peft(tmp_path / "a")
    (folder / "adapter_model.safetensors").write_text(LFS_POINTER)
    assert_names(load_error(folder, LfsPointerError), folder / "adapter_model.safetensors",
                 "Git LFS pointer")


@pytest.mark.real
def test_lfs_pointer_in_real_peft_folder(tmp_path):
    folder = copy_real(REAL_PEFT, tmp_path)
    weights = folder / "adapter_model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    weights.write_text("version https://git-lfs.github.com/spec/v1\n"
                       f"oid sha256:{digest}\nsize {weights.stat().st_size}\n")
    assert_names(load_error(folder, LfsPointerError), weights, "Git LFS pointer")


# ------------------------------------------------------------------------ truncated / corrupt


def _cuts(raw: bytes) -> dict[str, int]:
    n = struct.unpack("<Q", raw[:8])[0]
    return {"in_length": 5, "after_length": 8, "in_header": 8 + n // 2, "after_header": 8 + n,
            "in_data": 8 + n + (len(raw) - 8 - n) // 2, "last_byte": len(raw) - 1}


@pytest.mark.parametrize("where", ["in_length", "after_length", "in_header", "after_header",
                                   "in_data", "last_byte"])
def test_truncated_safetensors(tmp_path, where):
    full = write_kohya(tmp_path / "full.safetensors").read_bytes()
    p = tmp_path / "lora.safetensors"
    p.write_bytes(full[:_cuts(full)[where]])
    err = load_error(p, CorruptFileError)
    assert_names(err, p, "truncated")
    if where in ("in_data", "last_byte", "after_header"):  # the first tensor past the end is named
        assert err.key is not None and err.key.startswith(KOHYA) and repr(err.key) in str(err)


@pytest.mark.real
@pytest.mark.parametrize("where", ["in_header", "in_data", "last_byte"])
def test_truncated_real_adapter(tmp_path, where):
    folder = copy_real(REAL_PEFT, tmp_path)
    weights = folder / "adapter_model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[:_cuts(raw)[where]])
    assert_names(load_error(folder, CorruptFileError), weights, "truncated")


def test_corrupt_header_json(tmp_path):
    p = write_kohya(tmp_path / "lora.safetensors")
    raw = bytearray(p.read_bytes())
    raw[8:12] = b"#!x{"  # same length, no longer JSON
    p.write_bytes(bytes(raw))
    assert_names(load_error(p, CorruptFileError), p, "corrupt safetensors header", "not valid JSON")


def test_corrupt_header_length(tmp_path):
    p = write_kohya(tmp_path / "lora.safetensors")
    raw = p.read_bytes()
    p.write_bytes(struct.pack("<Q", 2**62) + raw[8:])
    assert_names(load_error(p, CorruptFileError), p, "corrupt safetensors", "header length")


@pytest.mark.parametrize("field,value,problem", [
    ("dtype", "Q7", "unknown dtype 'Q7'"),
    ("dtype", ["F32"], "unknown dtype ['F32']"),
    ("shape", [6, "4"], "bad shape or data_offsets"),
    ("shape", [True, 24], "bad shape or data_offsets"),  # JSON true is no dimension
    ("data_offsets", [False, 96], "bad shape or data_offsets"),
    ("shape", [6, 5], "needs 120 bytes but data_offsets give 96"),
    ("data_offsets", [0, 10**9], "lie outside"),
])
def test_corrupt_header_entry(tmp_path, field, value, problem):
    p = write_kohya(tmp_path / "lora.safetensors")
    key = f"{KOHYA}.lora_up.weight"
    _rewrite(p, lambda h: {**h, key: {**h[key], field: value}})
    assert_names(load_error(p, CorruptFileError), p, problem, key=key)


@pytest.mark.parametrize("how,problem", [
    ("overlap", "start at 0 where 96 was expected"),  # two tensors claim the same bytes
    ("tail", "cover 224 of the 225 data bytes"),  # a stray byte after the last tensor
])
def test_tensors_must_tile_the_data(tmp_path, how, problem):
    p = write_kohya(tmp_path / "lora.safetensors", kohya_tensors(alpha=None))
    down, up = f"{KOHYA}.lora_down.weight", f"{KOHYA}.lora_up.weight"  # 128 and 96 bytes

    def edit(h):
        if how == "overlap":  # up moves onto down's first 96 bytes
            first, second = sorted((down, up), key=lambda k: h[k]["data_offsets"][0])
            size = h[second]["data_offsets"][1] - h[first]["data_offsets"][1]
            h[second]["data_offsets"] = [0, size]
        return h

    _rewrite(p, edit)
    if how == "tail":
        p.write_bytes(p.read_bytes() + b"\0")
    err = load_error(p, CorruptFileError)
    assert_names(err, p, "corrupt safetensors", problem)


@pytest.mark.parametrize("meta", [[], "", 0])
def test_metadata_must_be_a_map(tmp_path, meta):
    p = write_kohya(tmp_path / "lora.safetensors")
    _rewrite(p, lambda h: {**h, "__metadata__": meta})
    assert_names(load_error(p, CorruptFileError), p, "metadata", "must map strings to strings")


def test_unaligned_tensors_are_read_through_safetensors(tmp_path):
    """A writer that does not align tensors to their element size: read correctly all the same."""
    down, up = rand(4, 8, seed=1), rand(6, 4, seed=2)
    tail = [("flag", "U8", [1], b"\x01"), (f"{KOHYA}.lora_down.weight", "F32", [4, 8], down),
            (f"{KOHYA}.lora_up.weight", "F32", [6, 4], up)]
    header, data = {}, b""
    for key, dtype, shape, value in tail:
        raw = value if isinstance(value, bytes) else value.numpy().tobytes()
        header[key] = {"dtype": dtype, "shape": shape,
                       "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    p = tmp_path / "lora.safetensors"
    p.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    from lorakit.io import read_safetensors

    tensors, _ = read_safetensors(p)
    assert torch.equal(tensors[f"{KOHYA}.lora_down.weight"], down)
    assert torch.equal(tensors[f"{KOHYA}.lora_up.weight"], up)
    assert tensors["flag"].tolist() == [1]


def test_reader_maps_the_file_copy_on_write(tmp_path):
    """Every tensor is a view of one mapping; writing to one never changes the file, and the
    values, dtypes and shapes equal safetensors' own reader's."""
    from lorakit.io import read_safetensors

    t = {"a": rand(3, 5).half(), "b": rand(7).double(), "c": torch.arange(6).reshape(2, 3),
         "d": torch.tensor([True, False]), "e": rand(2, 2).bfloat16(), "f": torch.zeros(0, 4)}
    p = tmp_path / "x.safetensors"
    save_file(t, str(p))
    before = p.read_bytes()
    got, _ = read_safetensors(p)
    ref = load_file(str(p))
    for k in t:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
    ptrs = {v.untyped_storage().data_ptr() for v in got.values() if v.numel()}
    assert len(ptrs) == 1
    got["a"].fill_(7)
    got["b"].zero_()
    assert p.read_bytes() == before
    assert torch.equal(read_safetensors(p)[0]["a"], t["a"])


def test_non_finite_scan_names_the_first_module_in_order(tmp_path):
    """Tensors of one file are scanned as one run; the error still names the first bad module
    in the adapter's order, whichever comes first in the file."""
    mods = [f"model.layers.{i}.self_attn.q_proj" for i in range(12)]
    t = {}
    for i, mod in enumerate(mods):
        t[f"base_model.model.{mod}.lora_A.weight"] = rand(4, 8, seed=i).half()
        t[f"base_model.model.{mod}.lora_B.weight"] = rand(8, 4, seed=100 + i).half()
    folder = write_peft(tmp_path / "ok", tensors=t)
    adapter = lorakit.load(folder)
    order = list(adapter.modules)
    first, later = order[5], order[9]
    for mod, where, bad in ((later, "lora_A", float("inf")), (first, "lora_B", float("nan"))):
        t[f"base_model.model.{mod}.{where}.weight"][1, 2] = bad
    folder = write_peft(tmp_path / "bad", tensors=t)
    assert_names(load_error(folder, NonFiniteError), folder / "adapter_model.safetensors",
                 "lora_B", "NaN or Inf", key=first)


def test_flat_runs_cover_every_entry_once():
    """Back-to-back views of one storage merge into one run; other tensors stay as they are."""
    from lorakit.adapter import _flat_runs

    base = torch.arange(40, dtype=torch.float32)
    views = [base[0:10].view(2, 5), base[10:16], base[16:40].view(4, 6)]  # back to back
    loose = [torch.ones(3, 3), base[0:40].view(8, 5).mT]  # separate storage; not contiguous
    runs = _flat_runs([views[2], loose[0], views[0], views[1], loose[1]])
    merged = [r for r in runs if r.numel() == 40 and r.is_contiguous()]
    assert len(merged) == 1 and torch.equal(merged[0], base)
    assert sorted(r.numel() for r in runs) == [9, 40, 40]


def test_json_with_huge_integer_is_corrupt_not_a_crash(tmp_path):
    """json raises a plain ValueError for integers past int_max_str_digits."""
    p = write_kohya(tmp_path / "lora.safetensors")
    raw = p.read_bytes()
    n = header_len(p)
    blob = raw[8:8 + n].replace(b'"shape":[', b'"shape":[' + b"9" * 5000 + b",", 1)
    p.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    assert_names(load_error(p, CorruptFileError), p, "not valid JSON")


def test_deeply_nested_header_is_corrupt_not_a_crash(tmp_path):
    p = tmp_path / "lora.safetensors"
    blob = b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    p.write_bytes(struct.pack("<Q", len(blob)) + blob)
    assert_names(load_error(p, CorruptFileError), p, "not valid JSON")


def test_corrupt_config_json(tmp_path):
    folder = write_peft(tmp_path / "a")
    (folder / "adapter_config.json").write_text('{"r": 4, "lora_alpha": ')
    assert_names(load_error(folder, CorruptFileError), folder / "adapter_config.json",
                 "not valid JSON")


# ------------------------------------------------------------------------ config/weights mismatch


def test_config_rank_differs_from_weights(tmp_path):
    folder = write_peft(tmp_path / "a", {"r": 8})  # tensors are rank 4
    err = load_error(folder, ConfigMismatchError)
    assert_names(err, folder / "adapter_config.json", "rank 8", "rank 4", key=PEFT_MOD)


@pytest.mark.real
def test_real_config_rank_differs_from_weights(tmp_path):
    folder = copy_real(REAL_PEFT, tmp_path)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["r"] = int(cfg["r"]) * 2
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    err = load_error(folder, ConfigMismatchError)
    assert_names(err, folder / "adapter_config.json", f"rank {cfg['r']}", "lora_A has rank")
    assert err.key and err.key in str(err)


def test_peft_weights_without_config(tmp_path):
    folder = write_peft(tmp_path / "a")
    (folder / "adapter_config.json").unlink()
    weights = folder / "adapter_model.safetensors"
    for path in (folder, weights):  # the folder, or the weights file itself
        assert_names(load_error(path, ConfigMismatchError), weights,
                     "PEFT weights without adapter_config.json")


def test_lora_a_without_lora_b(tmp_path):
    folder = write_peft(tmp_path / "a", tensors={PEFT_A: rand(4, 8)})
    err = load_error(folder, ConfigMismatchError)
    assert_names(err, folder / "adapter_model.safetensors", "lora_B", "missing", key=PEFT_MOD)


def test_kohya_down_without_up(tmp_path):
    p = write_kohya(tmp_path / "lora.safetensors",
                    {f"{KOHYA}.lora_down.weight": rand(4, 8), f"{KOHYA}.alpha": torch.tensor(4.0)})
    assert_names(load_error(p, ConfigMismatchError), p, "lora_up", "missing", key=KOHYA_KEY)


@pytest.mark.parametrize("field,value,problem,key", [  # config fields are typed where they enter
    ("r", "4", "must be an integer >= 1", "r"),
    ("r", [4], "must be an integer >= 1", "r"),
    ("lora_alpha", "8", "must be a finite number", "lora_alpha"),
    ("rank_pattern", ["q_proj"], "must be a mapping of patterns to ranks", "rank_pattern"),
    ("use_dora", True, "no magnitude vector", PEFT_MOD),
])
def test_config_values_of_the_wrong_kind(tmp_path, field, value, problem, key):
    folder = write_peft(tmp_path / "a", {field: value})
    err = load_error(folder, ConfigMismatchError)
    assert_names(err, folder / "adapter_config.json", problem, key=key)


# ------------------------------------------------------------------------ shapes and values


def test_peft_ab_shape_mismatch(tmp_path):
    folder = write_peft(tmp_path / "a", {"r": 4}, {PEFT_A: rand(4, 8), PEFT_B: rand(8, 3)})
    assert_names(load_error(folder, ShapeMismatchError), folder / "adapter_model.safetensors",
                 "rank mismatch", "(4, 8)", "(8, 3)", key=PEFT_MOD)


def test_kohya_ab_shape_mismatch(tmp_path):
    t = kohya_tensors()
    t[f"{KOHYA}.lora_up.weight"] = rand(6, 3)
    p = write_kohya(tmp_path / "lora.safetensors", t)
    assert_names(load_error(p, ShapeMismatchError), p, "rank mismatch", key=KOHYA_KEY)


def test_conv_factor_shapes(tmp_path):
    t = {f"{KOHYA}.lora_down.weight": rand(4, 8, 3, 3), f"{KOHYA}.lora_up.weight": rand(6, 4, 3, 3)}
    p = write_kohya(tmp_path / "lora.safetensors", t)
    assert_names(load_error(p, ShapeMismatchError), p, "conv LoRA needs", key=KOHYA_KEY)


def test_dora_magnitude_shape(tmp_path):
    t = kohya_tensors()
    t[f"{KOHYA}.dora_scale"] = rand(5)  # neither 6 outputs nor 8 inputs
    p = write_kohya(tmp_path / "lora.safetensors", t)
    assert_names(load_error(p, ShapeMismatchError), p, "DoRA magnitude", "(5,)", key=KOHYA_KEY)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_lora_b(tmp_path, bad):
    up = rand(8, 4, seed=4)
    up[3, 1] = bad
    folder = write_peft(tmp_path / "a", tensors={PEFT_A: rand(4, 8), PEFT_B: up})
    assert_names(load_error(folder, NonFiniteError), folder / "adapter_model.safetensors",
                 "lora_B", "NaN or Inf", key=PEFT_MOD)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_non_finite_half_precision_lora_b(tmp_path, dtype):
    t = {k: v.to(dtype) for k, v in kohya_tensors(alpha=None).items()}
    t[f"{KOHYA}.lora_up.weight"][0, 0] = float("nan")
    p = write_kohya(tmp_path / "lora.safetensors", t)
    assert_names(load_error(p, NonFiniteError), p, "lora_B", "NaN or Inf", key=KOHYA_KEY)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_kohya_alpha(tmp_path, bad):
    p = write_kohya(tmp_path / "lora.safetensors", kohya_tensors(alpha=bad))
    assert_names(load_error(p, NonFiniteError), p, f"alpha is {bad}", key=f"{KOHYA}.alpha")


@pytest.mark.real
def test_non_finite_in_real_adapter(tmp_path):
    folder = copy_real(REAL_PEFT, tmp_path)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = sorted(k for k in tensors if k.endswith("lora_B.weight"))[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    err = load_error(folder, NonFiniteError)
    module = key[len("base_model.model."):-len(".lora_B.weight")]
    assert_names(err, weights, "lora_B", "NaN or Inf", key=module)


def test_non_floating_factors(tmp_path):
    t = {k: v.to(torch.int32) for k, v in kohya_tensors(alpha=None).items()}
    p = write_kohya(tmp_path / "lora.safetensors", t)
    assert_names(load_error(p, CorruptFileError), p, "floating point", "int32", key=KOHYA_KEY)


# ------------------------------------------------------------------------ layouts and variants


def test_unknown_key_layout(tmp_path):
    p = tmp_path / "weights.safetensors"
    save_file({"encoder.block.0.weight": rand(4, 4), "encoder.block.0.bias": rand(4)}, str(p))
    assert_names(load_error(p, UnknownLayoutError), p, "no LoRA layout",
                 key="encoder.block.0.bias")


def test_stray_key_in_diffusers_layout(tmp_path):
    p = tmp_path / "pytorch_lora_weights.safetensors"
    mod = "unet.mid_block.attentions.0.proj_in"
    save_file({f"{mod}.lora_A.weight": rand(4, 8), f"{mod}.lora_B.weight": rand(6, 4),
               f"{mod}.lora_C.weight": rand(2, 2)}, str(p))
    assert_names(load_error(p, UnknownLayoutError), p, "does not fit",
                 key=f"{mod}.lora_C.weight")


def test_loha_keys_in_kohya_file(tmp_path):
    p = tmp_path / "loha.safetensors"
    save_file({f"{KOHYA}.hada_w1_a": rand(6, 4), f"{KOHYA}.hada_w1_b": rand(4, 8),
               f"{KOHYA}.hada_w2_a": rand(6, 4), f"{KOHYA}.hada_w2_b": rand(4, 8),
               f"{KOHYA}.alpha": torch.tensor(4.0)}, str(p))
    # read since issue 16 (its exact LoRA form: tests/formats/test_lycoris.py); one tensor
    # missing is named
    assert lorakit.load(p).modules[next(iter(lorakit.load(p).modules))].origin == "loha"
    save_file({f"{KOHYA}.hada_w1_a": rand(6, 4), f"{KOHYA}.hada_w1_b": rand(4, 8),
               f"{KOHYA}.hada_w2_a": rand(6, 4)}, str(p))
    assert_names(load_error(p, ConfigMismatchError), p, "hada_w2_b is missing", "LoHa",
                 key=f"{KOHYA}.hada_w2_b")


def test_loha_keys_beside_lora_keys(tmp_path):
    t = kohya_tensors()
    t["lora_unet_mid_block_attentions_0_proj_out.hada_w1_a"] = rand(6, 4)
    p = write_kohya(tmp_path / "mixed.safetensors", t)
    # a lone LoHa tensor beside LoRA modules: the module's missing tensors are named
    assert_names(load_error(p, ConfigMismatchError), p, "LoHa", "missing",
                 key="lora_unet_mid_block_attentions_0_proj_out.hada_w1_b")


def test_peft_type_loha(tmp_path):
    folder = write_peft(tmp_path / "a", {"peft_type": "LOHA"})
    assert_names(load_error(folder, UnsupportedVariantError), folder / "adapter_config.json",
                 "LOHA", "not a LoRA", key="peft_type")


# ------------------------------------------------------------------------ pickles


class Payload:
    """A custom class: a weights-only load must refuse it, never construct it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker


class Sneaky:
    """Unpickling this would create a folder (the classic code-execution pickle)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("cls", [Payload, Sneaky])
@pytest.mark.parametrize("where", ["file", "peft_folder"])
def test_pickle_not_weights_only_is_refused(tmp_path, monkeypatch, cls, where):
    marker = tmp_path / "unpickled"
    state = {**peft_tensors(), "base_model.model.extra": cls(str(marker))}
    if where == "file":
        p = path = tmp_path / "adapter.bin"
    else:
        path = write_peft(tmp_path / "a")
        (path / "adapter_model.safetensors").unlink()
        p = path / "adapter_model.bin"
    torch.save(state, p)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    err = load_error(path, CorruptFileError)
    assert_names(err, p, "weights-only", cls.__qualname__ if cls is Payload else "mkdir")
    assert calls and all(w is True for w in calls), calls
    assert not marker.exists(), "the pickle was executed"


def test_weights_only_pickle_loads(tmp_path):
    """The control: a plain state dict in adapter_model.bin is read."""
    folder = write_peft(tmp_path / "a")
    (folder / "adapter_model.safetensors").unlink()
    torch.save(peft_tensors(), folder / "adapter_model.bin")
    assert lorakit.load(folder).modules[PEFT_MOD].rank == 4


def test_pickle_that_is_not_a_state_dict(tmp_path):
    p = tmp_path / "adapter.bin"
    torch.save([rand(2, 2)], p)
    assert_names(load_error(p, CorruptFileError), p, "not a state dict")


def test_garbage_pickle(tmp_path):
    p = tmp_path / "adapter.bin"
    p.write_bytes(b"\x80\x04garbage" * 10)
    assert_names(load_error(p, CorruptFileError), p, "weights-only")


# ------------------------------------------------------------------------ outputs


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """``lorakit ARGS`` in process through main() (the entry point with the error contract)."""
    with pytest.raises(SystemExit) as info:
        main([*args])
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def snapshot(*roots: Path) -> dict[str, tuple[str, int, int]]:
    """sha256, mtime_ns and size of every file under ``roots``."""
    snap = {}
    for root in roots:
        for p in sorted([root] if root.is_file() else root.rglob("*")):
            if p.is_file():
                st = p.stat()
                snap[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns,
                                st.st_size)
    return snap


@pytest.mark.parametrize("to,name", [("peft", "out_dir"), ("kohya", "out.safetensors"),
                                     ("diffusers", "out_dir")])
def test_existing_output_needs_force(tmp_path, capsys, to, name):
    src = write_peft(tmp_path / "src")
    out = tmp_path / name
    if out.suffix:
        out.write_bytes(b"precious bytes")
    else:
        out.mkdir()
        (out / "keep.txt").write_text("precious")
    before = snapshot(out)
    adapter = lorakit.load(src)
    with pytest.raises(OutputExistsError) as info:
        lorakit.save(lorakit.convert(adapter, to), out, to)
    assert_names(info.value, out, "already exists", "--force")
    code, _, err = run_cli(capsys, "convert", str(src), "--to", to, "-o", str(out))
    assert code == 1 and "already exists" in err and str(out) in err
    assert snapshot(out) == before  # byte-identical, same mtime
    code, _, err = run_cli(capsys, "convert", str(src), "--to", to, "-o", str(out), "--force")
    assert code == 0, err
    again = lorakit.load(out)
    assert again.modules[next(iter(again.modules))].rank == 4
    if not out.suffix:  # --force replaces lorakit's files only: the user's file stays
        assert (out / "keep.txt").read_text() == "precious"


def _partial_writer(exc: BaseException):
    """Stands in for lorakit.io._write_all: part of the file, then the failure."""
    def write(fd, data):
        os.write(fd, b"\x00" * 64)
        raise exc

    return write


@pytest.mark.parametrize("to,name", [("peft", "out_dir"), ("kohya", "lora.safetensors"),
                                     ("diffusers", "out_dir")])
@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"),
                                 RuntimeError("writer failed"), KeyboardInterrupt()],
                         ids=["ENOSPC", "RuntimeError", "KeyboardInterrupt"])
def test_failed_write_leaves_nothing(tmp_path, monkeypatch, to, name, exc):
    adapter = lorakit.convert(lorakit.load(write_peft(tmp_path / "src")), to)
    outs = tmp_path / "outs" / "nested"  # created by the save, removed again on failure
    out = outs / name
    monkeypatch.setattr(lorakit.io, "_write_all", _partial_writer(exc))
    expected = KeyboardInterrupt if isinstance(exc, KeyboardInterrupt) else OutputWriteError
    with pytest.raises(expected) as info:
        lorakit.save(adapter, out, to)
    if expected is OutputWriteError:  # named at the user's output path, not the temporary one
        err = info.value
        assert err.path == str(out) or err.path.startswith(str(out) + os.sep), err.path
        assert "\n" not in str(err) and ".tmp" not in str(err), str(err)
        assert "cannot write" in str(err) and str(exc.args[-1]) in str(err), str(err)
    assert not (tmp_path / "outs").exists(), list((tmp_path / "outs").rglob("*"))


def test_failed_write_keeps_existing_output_and_folder(tmp_path, monkeypatch):
    adapter = lorakit.load(write_kohya(tmp_path / "in.safetensors"))
    outs = tmp_path / "outs"
    outs.mkdir()
    (outs / "other.txt").write_text("unrelated")
    out = lorakit.save(adapter, outs / "lora.safetensors")
    before = snapshot(outs)
    monkeypatch.setattr(lorakit.io, "_write_all", _partial_writer(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OutputWriteError):
        lorakit.save(adapter, out, force=True)
    assert snapshot(outs) == before  # the old output intact, no temporary file beside it


def test_output_may_not_replace_an_input(tmp_path, capsys):
    src = write_kohya(tmp_path / "lora.safetensors")
    before = snapshot(tmp_path)
    for out in (src, tmp_path):  # the input itself, or the folder holding it
        code, _, err = run_cli(capsys, "convert", str(src), "--to", "kohya", "-o", str(out),
                               "--force")
        assert code == 1 and err.count("\n") == 1, err
        assert err.startswith("lorakit: error:") and "input" in err and str(out) in err
    assert snapshot(tmp_path) == before


def _inputs(tmp_path: Path) -> list[Path]:
    peft = write_peft(tmp_path / "in_peft")
    kohya = write_kohya(tmp_path / "in_kohya.safetensors")
    diffusers = lorakit.save(lorakit.convert(lorakit.load(kohya), "diffusers"),
                             tmp_path / "in_diffusers.safetensors", "diffusers")
    return [peft, kohya, diffusers]


def test_inputs_never_touched(tmp_path, capsys):
    inputs = _inputs(tmp_path)
    try:
        real = require_real(REAL_PEFT)  # read in place: the original must not change either
        inputs.append(real)
    except pytest.skip.Exception:
        pass
    before = snapshot(*inputs)
    code, out, err = run_cli(capsys, "inspect", *map(str, inputs), "--json")
    assert code == 0, err
    for i, src in enumerate(inputs):
        for to in ("peft", "kohya", "diffusers"):
            dst = tmp_path / "outs" / f"{i}_{to}"
            code, _, err = run_cli(capsys, "convert", str(src), "--to", to, "-o", str(dst))
            assert code == 0 or err.startswith("lorakit: error:"), err
    assert snapshot(*inputs) == before


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_all_finite_survives_an_overflowing_sum(dtype):
    from lorakit.adapter import all_finite

    big = torch.full((4096,), torch.finfo(dtype).max / 2, dtype=dtype)  # the sum overflows
    assert all_finite(big)
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = big.clone()
        t[7] = bad
        assert not all_finite(t)
    assert all_finite(torch.empty(0, dtype=dtype))
