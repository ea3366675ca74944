"""Where adapters come from: paths, globs, collection folders, manifest files and ``hf://``.

A *source* is one adapter: a PEFT folder, a diffusers/kohya weights file (or a folder holding
exactly one), or an ``hf://org/repo[@revision][/path]`` URI (see :mod:`lorakit.hub`). A
*collection* expands to many:

* a glob (``runs/*/adapter``, ``loras/**/*.safetensors``), matched in sorted order;
* a collection folder: a folder that is not itself an adapter; its members are the adapter
  subfolders and the weights files directly inside it, in sorted order;
* a manifest: a text file (``.txt``, ``.lst``, ``.list``, ``.manifest``, or any file named with a
  leading ``@``) with one source per line, paths relative to the manifest, ``#`` comments.

Every problem in a list of sources is reported together (:func:`expand`).

Example:
    >>> plan = expand(["../shared/real_adapters"])          # doctest: +SKIP
    >>> plan.is_collection, plan.sources[0].name            # doctest: +SKIP
    (True, 'bert_hareshj')
"""

from __future__ import annotations

import glob
import hashlib
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import InputNotFoundError, LorakitError
from lorakit.hub import SCHEME, is_hub, parse

CONFIG_NAME = "adapter_config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
MANIFEST_SUFFIXES = (".txt", ".lst", ".list", ".manifest")
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Source:
    """One adapter to load: ``spec`` (a path or an ``hf://`` URI), a default output ``name``
    (no suffix) and whether it is a single weights file (outputs keep a file layout)."""

    spec: str
    name: str
    is_file: bool


@dataclass(frozen=True)
class SourcePlan:
    """The expansion of the sources given to a command."""

    sources: list[Source]
    is_collection: bool  # several sources, or any glob / manifest / collection folder
    manifests: tuple[Path, ...] = ()  # manifest files read (inputs too: never an output)


def is_adapter_dir(path: Path) -> bool:
    """A folder that is one adapter: it has ``adapter_config.json``, the diffusers weights file,
    or exactly one weights file and no adapter subfolders.

    Example:
        >>> is_adapter_dir(Path("../shared/real_adapters/gpt2_r4_jhess"))   # doctest: +SKIP
        True
    """
    if (path / CONFIG_NAME).is_file() or (path / "pytorch_lora_weights.safetensors").is_file():
        return True
    files = _weight_files(path)
    return len(files) == 1 and not any(_is_member_dir(d) for d in _subdirs(path))


def collection_members(folder: Path) -> list[Path]:
    """Adapter subfolders and weights files directly inside ``folder`` (sorted by name).

    Example:
        >>> [p.name for p in collection_members(Path("../shared/real_adapters"))][:2]  # doctest: +SKIP
        ['bert_hareshj', 'distilbert_emotion_dayanidhi']
    """
    members = [d for d in _subdirs(folder) if _is_member_dir(d)] + _weight_files(folder)
    return sorted(members, key=lambda p: p.name)


def _is_member_dir(d: Path) -> bool:
    return (d / CONFIG_NAME).is_file() or len(_weight_files(d)) == 1


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix in WEIGHT_SUFFIXES and not p.name.startswith("."))


def source_for(path: Path, spec: str | None = None) -> Source:
    """The :class:`Source` of one local adapter path."""
    if path.is_file():
        return Source(spec or str(path), path.stem, True)
    return Source(spec or str(path), path.name, False)


def expand(specs: list[str] | tuple[str, ...]) -> SourcePlan:
    """Expand paths, globs, collection folders, manifests and ``hf://`` URIs into sources.

    Every unusable entry is collected and reported in one :class:`InputNotFoundError`.

    Example:
        >>> expand(["a.safetensors", "b.safetensors"]).is_collection   # doctest: +SKIP
        True
    """
    out: list[Source] = []
    problems: list[str] = []
    manifests: list[Path] = []
    collection = len(specs) > 1
    for spec in specs:
        found, many = _expand_one(spec, problems, depth=0, manifests=manifests)
        out += found
        collection = collection or many
    if problems:
        head = f"{len(problems)} source(s) are not usable" if len(problems) > 1 else "source"
        raise InputNotFoundError(f"{head}: " + "; ".join(problems))
    seen: set[str] = set()
    unique = []
    for s in out:
        key = s.spec if is_hub(s.spec) else str(Path(s.spec).resolve())
        if key not in seen:
            seen.add(key)
            unique.append(s)
    return SourcePlan(unique, collection, tuple(dict.fromkeys(manifests)))


def _expand_one(spec: str, problems: list[str], depth: int,
                manifests: list[Path] | None = None) -> tuple[list[Source], bool]:
    if is_hub(spec):
        try:
            hub = parse(spec)
        except LorakitError as e:
            problems.append(str(e))
            return [], False
        return [Source(spec, hub.name, hub.path.endswith(WEIGHT_SUFFIXES))], False
    manifest = spec[1:] if spec.startswith("@") else None
    path = Path(manifest or spec)
    if manifest is not None or (path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES):
        if manifests is not None:
            manifests.append(path)
        return _read_manifest(path, problems, depth, manifests), True
    if not path.exists() and _GLOB_CHARS & set(spec):
        matches = sorted(glob.glob(spec, recursive=True))
        if not matches:
            problems.append(f"{spec}: the pattern matches nothing")
        found = []
        for m in matches:
            found += _expand_path(Path(m), problems)
        return found, True
    if not path.exists():
        problems.append(f"{spec}: no such file or folder")
        return [], False
    if path.is_dir() and not is_adapter_dir(path) and collection_members(path):
        return _expand_path(path, problems), True
    # one adapter (a folder without adapter files gets the loader's own error)
    return [source_for(path, spec)], False


def _expand_path(path: Path, problems: list[str]) -> list[Source]:
    if path.is_file() or is_adapter_dir(path):
        return [source_for(path)]
    members = collection_members(path)
    if not members:
        problems.append(f"{path}: folder holds no adapter files ({CONFIG_NAME}, *.safetensors "
                        "or adapter subfolders)")
    return [source_for(m) for m in members]


def _read_manifest(path: Path, problems: list[str], depth: int,
                   manifests: list[Path] | None = None) -> list[Source]:
    if depth > 4:
        problems.append(f"{path}: manifests nested too deeply")
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"{path}: cannot read the manifest ({e})")
        return []
    found: list[Source] = []
    for n, line in enumerate(lines, 1):
        entry = line.split(" #", 1)[0].strip()
        if not entry or entry.startswith("#"):
            continue
        if not is_hub(entry) and not Path(entry).is_absolute():
            entry = str(path.parent / entry)
        sub: list[str] = []
        items, _ = _expand_one(entry, sub, depth + 1, manifests)
        found += items
        problems += [f"{path}:{n}: {p}" for p in sub]
    if not found and not problems:
        problems.append(f"{path}: manifest lists no sources")
    return found


def local_path(spec: str) -> Path:
    """The local path of a source: ``hf://`` URIs are fetched (cached) first.

    Example:
        >>> local_path("hf://org/lora")    # doctest: +SKIP
    """
    if is_hub(spec):
        from lorakit.hub import resolve

        return resolve(spec)
    return Path(spec)


def load_source(spec: str, format=None, *, local: Path | None = None, family: str | None = None,
                ignore_unknown: bool = False):
    """Load one adapter from a path or an ``hf://`` URI: the source resolves to local files
    (:func:`local_path`), then :func:`lorakit.formats.load_adapter` reads them; errors about
    cached Hub files name the ``hf://`` source instead of the cache path. ``local`` is the
    already resolved path, if any.

    Example:
        >>> load_source("hf://org/lora").source_format    # doctest: +SKIP
        'peft'
    """
    from lorakit.formats import load_adapter

    local = local if local is not None else local_path(spec)
    opts = {"family": family, "ignore_unknown": ignore_unknown}
    if not is_hub(spec):
        return load_adapter(local, format, **opts)
    try:
        adapter = load_adapter(local, format, **opts)
    except LorakitError as e:
        _repoint(e, local, spec)
        raise
    adapter.source = spec
    return adapter


def _repoint(e: LorakitError, local: Path, spec: str) -> None:
    root = str(local if local.is_dir() else local.parent)
    base = spec if local.is_dir() else spec.rsplit("/", 1)[0] if "/" in spec[len(SCHEME):] \
        else spec
    if e.path and e.path.startswith(root):
        e.path = base + e.path[len(root):]
        e.args = (e.message,)


def adapter_files(local: Path) -> list[Path]:
    """The files that make up an adapter (config and weights), for hashing."""
    if local.is_file():
        files = [local]
        config = local.parent / CONFIG_NAME
        if local.name.startswith("adapter_model") and config.is_file():
            files.append(config)
        return sorted(files)
    return sorted(p for p in local.iterdir() if p.is_file() and not p.name.startswith(".")
                  and (p.name == CONFIG_NAME or p.suffix in WEIGHT_SUFFIXES))


def digest(files: list[Path], root: Path | None = None) -> str:
    """sha256 over ``(name, content)`` of ``files`` (names relative to ``root``).

    Example:
        >>> digest([])
        'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'
    """
    h = hashlib.sha256()
    for f in files:
        name = f.relative_to(root).as_posix() if root else f.name
        h.update(name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


__all__ = ["Source", "SourcePlan", "expand", "is_adapter_dir", "collection_members",
           "local_path", "load_source", "adapter_files", "digest", "is_hub"]
