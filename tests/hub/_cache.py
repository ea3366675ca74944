"""Build huggingface_hub's on-disk cache layout (what ``hf_hub_download`` leaves behind).

``<cache>/models--org--repo/{blobs/<hash>, snapshots/<commit>/<path> -> ../../blobs/<hash>,
refs/<branch>}``: the layout huggingface_hub reads with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def add_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, bytes],
                 refs: tuple[str, ...] = ()) -> Path:
    """Store ``files`` (path in repo -> bytes) as commit ``commit`` and point ``refs`` at it."""
    org, name = repo_id.split("/")
    repo = cache / f"models--{org}--{name}"
    snap = repo / "snapshots" / commit
    for rel, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snap


def folder_bytes(folder: Path, prefix: str = "") -> dict[str, bytes]:
    """Every file of ``folder`` as ``{prefix + name: bytes}``."""
    return {f"{prefix}{p.name}": p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
