"""Low-level file reading and atomic writing shared by every format.

Reading checks what would otherwise surface as an obscure exception: missing or empty files, Git LFS
pointers, truncated or malformed safetensors headers, and pickles (read with ``weights_only=True``
only). Writing goes to a temporary name beside the output and is renamed into place when complete,
so a failed job never leaves a partial file, and an existing output is only replaced with ``force``.

Example:
    >>> import tempfile, torch, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_output(d / "x.safetensors") as tmp:
    ...     write_safetensors(tmp, {"w": torch.zeros(2)}, {"k": "v"})
    >>> sorted(read_safetensors(d / "x.safetensors")[0])
    ['w']
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from lorakit.errors import (
    CorruptFileError,
    InputNotFoundError,
    LfsPointerError,
    OutputExistsError,
)

LFS_MAGIC = b"version https://git-lfs.github.com/spec/v1"
_ST_DTYPES = {
    "F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2",
    "U16", "U32", "U64", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64",
}
_MAX_HEADER = 100 * 1024 * 1024


def check_file(path: Path) -> None:
    """Raise a named error for a missing, empty or Git LFS pointer file."""
    if not path.exists():
        raise InputNotFoundError("no such file or folder", path=path)
    if path.is_dir():
        raise InputNotFoundError("is a folder, expected a file", path=path)
    size = path.stat().st_size
    if size == 0:
        raise InputNotFoundError("file is empty", path=path)
    with open(path, "rb") as f:
        head = f.read(len(LFS_MAGIC))
    if head == LFS_MAGIC:
        raise LfsPointerError(
            "is a Git LFS pointer, not the weights", path=path,
            hint="run `git lfs pull` in its repository, or download the file itself")


def read_safetensors_header(path: Path) -> tuple[dict, dict[str, str]]:
    """Parse and validate the JSON header; return ``(tensor_entries, metadata)``.

    Every inconsistency (length past the end, bad JSON, offsets outside the data, unknown dtype,
    shape/size mismatch) raises :class:`CorruptFileError` naming the problem.
    """
    check_file(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CorruptFileError(f"truncated safetensors file ({size} bytes, no header)", path=path)
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, _MAX_HEADER):
            raise CorruptFileError(
                f"truncated or corrupt safetensors: header claims {n} bytes but the file has "
                f"{size - 8} after the length prefix", path=path)
        blob = f.read(n)
    try:
        header = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"corrupt safetensors header (not valid JSON: {e})", path=path) from e
    if not isinstance(header, dict):
        raise CorruptFileError("corrupt safetensors header (not a JSON object)", path=path)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CorruptFileError("corrupt safetensors metadata (must map strings to strings)",
                               path=path)
    data_len = size - 8 - n
    for key, entry in header.items():
        _check_entry(path, key, entry, data_len)
    return header, meta


def _check_entry(path: Path, key: str, entry: object, data_len: int) -> None:
    if not isinstance(entry, dict):
        raise CorruptFileError("corrupt header entry (not an object)", path=path, key=key)
    dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _ST_DTYPES:
        raise CorruptFileError(f"unknown dtype {dtype!r}", path=path, key=key)
    if (not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape)
            or not isinstance(offs, list) or len(offs) != 2
            or not all(isinstance(o, int) for o in offs)):
        raise CorruptFileError("corrupt header entry (bad shape or data_offsets)", path=path,
                               key=key)
    start, end = offs
    if not 0 <= start <= end <= data_len:
        raise CorruptFileError(
            f"truncated or corrupt safetensors: tensor bytes [{start}, {end}) lie outside the "
            f"{data_len} data bytes", path=path, key=key)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor and the metadata of a safetensors file, with named errors."""
    from safetensors import safe_open

    _, meta = read_safetensors_header(path)
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[k] = f.get_tensor(k)
    except Exception as e:  # the Rust reader raises its own error type for any corrupt byte
        raise CorruptFileError(f"corrupt safetensors file ({type(e).__name__}: {e})",
                               path=path) from e
    return tensors, meta


def read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """Load a ``.bin``/``.pt`` state dict with ``torch.load(weights_only=True)`` only."""
    check_file(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CorruptFileError(
            f"cannot read as a weights-only PyTorch file ({type(e).__name__}: {e})", path=path,
            hint="lorakit never unpickles arbitrary objects; convert it to safetensors") from e
    if not isinstance(obj, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CorruptFileError("not a state dict of named tensors", path=path)
    return obj


def read_json(path: Path) -> dict:
    check_file(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"not valid JSON ({e})", path=path) from e
    if not isinstance(obj, dict):
        raise CorruptFileError("expected a JSON object", path=path)
    return obj


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(clean, str(path), metadata=metadata or None)


def check_output(out: Path, force: bool) -> None:
    """Refuse an existing output unless ``force``."""
    if out.exists() and not force:
        raise OutputExistsError("output already exists", path=out,
                                hint="pass --force to overwrite")


@contextlib.contextmanager
def atomic_output(out: Path, *, force: bool = False, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; rename it onto ``out`` when the block succeeds.

    On any exception the temporary file or folder is removed and ``out`` is untouched.
    """
    out = Path(out)
    check_output(out, force)
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        _replace(tmp, out, force)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


def _replace(tmp: Path, out: Path, force: bool) -> None:
    if out.exists():
        if not force:
            raise OutputExistsError("output appeared while writing", path=out,
                                    hint="pass --force to overwrite")
        if out.is_dir() and not tmp.is_dir():
            shutil.rmtree(out)
        elif out.is_dir():
            old = out.with_name(f".{out.name}.old")
            if old.exists():
                shutil.rmtree(old)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
            return
        elif tmp.is_dir():
            out.unlink()
    if tmp.is_dir():
        tmp.chmod(0o755)
        for f in tmp.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
    else:
        tmp.chmod(0o644)
    os.replace(tmp, out)
