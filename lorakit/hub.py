"""Hugging Face Hub pull and push: ``hf://org/repo[@revision][/subfolder]`` sources and uploads.

Pull (:func:`resolve`) fetches only the files an adapter needs (``adapter_config.json`` plus
``adapter_model.safetensors``/``.bin`` for PEFT, else the one weights file) through
``huggingface_hub`` into its shared cache (``HF_HUB_CACHE``/``HF_HOME``, the cache every HF tool
uses) and returns the local path. ``HF_HUB_OFFLINE=1`` is honoured (read at call time): sources
resolve from the cache, and a source that is not cached is a clear error. A revision is a branch,
tag or commit (``@v2``, ``@<40-hex commit>``; write ``refs/pr/1`` as ``refs%2Fpr%2F1``); the path
after it is a subfolder or a single file of the repository.

Push (:func:`push`) uploads an adapter folder, a weights file or a collection folder in one
commit through ``HfApi`` with a model card (YAML front matter: ``base_model``,
``library_name: peft`` for PEFT output, tags; body: the command or recipe and the sources). The
token comes from ``HF_TOKEN`` or ``hf auth login`` and is never printed. ``dry_run`` plans the
upload and contacts nothing.

Example:
    >>> parse("hf://org/lora@v2/unet")
    HubSource(repo_id='org/lora', revision='v2', path='unet')
    >>> resolve("hf://org/lora@v2/unet")                      # doctest: +SKIP
    PosixPath('/root/.cache/huggingface/hub/models--org--lora/snapshots/3f1c.../unet')
    >>> push("out_dir", "me/my-lora", dry_run=True).files     # doctest: +SKIP
    [('adapter_config.json', 1024), ('adapter_model.safetensors', 1192672), ('README.md', 512)]
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import (
    ConfigMismatchError,
    GatedRepoAccessError,
    HubError,
    HubNotFoundError,
    HubOfflineError,
    InputNotFoundError,
    OptionError,
)

SCHEME = "hf://"
CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_TRUE = {"1", "ON", "YES", "TRUE"}
_LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN"


@dataclass(frozen=True)
class HubSource:
    """A parsed ``hf://org/repo[@revision][/path]``; ``path`` is '' for the repository root."""

    repo_id: str
    revision: str | None = None
    path: str = ""

    def __str__(self) -> str:
        rev = f"@{urllib.parse.quote(self.revision, safe='')}" if self.revision else ""
        return f"{SCHEME}{self.repo_id}{rev}{'/' + self.path if self.path else ''}"

    @property
    def name(self) -> str:
        """A file-system friendly name: the repo name, plus the path (``lora--unet``)."""
        parts = [self.repo_id.split("/")[-1], *[p for p in self.path.split("/") if p]]
        if parts[-1].endswith(WEIGHT_SUFFIXES):
            parts[-1] = Path(parts[-1]).stem
        return "--".join(parts)


def is_hub(source: object) -> bool:
    """Whether ``source`` is an ``hf://`` URI.

    Example:
        >>> is_hub("hf://org/repo"), is_hub("org/repo")
        (True, False)
    """
    return isinstance(source, str) and source.startswith(SCHEME)


def parse(source: str) -> HubSource:
    """Split ``hf://org/repo[@revision][/path]``; a malformed URI is an :class:`OptionError`.

    Example:
        >>> parse("hf://org/repo@refs%2Fpr%2F3/a/b.safetensors")
        HubSource(repo_id='org/repo', revision='refs/pr/3', path='a/b.safetensors')
    """
    if not is_hub(source):
        raise OptionError(f"not an {SCHEME} source: {source!r}")
    rest = source[len(SCHEME):]
    m = re.fullmatch(r"([^/@]+)/([^/@]+)(?:@([^/]+))?(?:/(.*))?", rest)
    if not m:
        raise OptionError(f"malformed Hub source {source!r}",
                          hint="write hf://org/repo[@revision][/subfolder]")
    org, repo, rev, path = m.groups()
    repo_id = f"{org}/{repo}"
    _validate_repo_id(repo_id, source)
    path = "/".join(p for p in (path or "").split("/") if p)
    if ".." in path.split("/"):
        raise OptionError(f"a Hub path may not contain '..': {source!r}")
    return HubSource(repo_id, urllib.parse.unquote(rev) if rev else None, path)


def _validate_repo_id(repo_id: str, source: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise OptionError(f"invalid Hub repository id {repo_id!r} ({e})", path=source) from e


def offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``), read now and at huggingface_hub import."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.strip().upper() in _TRUE


# ---------------------------------------------------------------------------------------- pull


def resolve(source: str) -> Path:
    """Fetch the adapter files of an ``hf://`` source (only those) and return the local path.

    PEFT sources return the folder holding ``adapter_config.json`` and the weights; a diffusers or
    kohya source returns its weights file. Files live in the shared HF cache.

    Example:
        >>> resolve("hf://org/lora")                   # doctest: +SKIP
        PosixPath('.../hub/models--org--lora/snapshots/<commit>')
    """
    src = parse(source)
    files, cached = _list_files(src)
    wanted, target = pick_files(files, src)
    local = {name: _download(src, name, cached) for name in wanted}
    return local[target] if target in local else local[wanted[0]].parent


def pull(source: str) -> Path:
    """Alias of :func:`resolve` (the public API's name for fetching a Hub adapter)."""
    return resolve(source)


def pick_files(files: list[str], src: HubSource) -> tuple[list[str], str]:
    """Choose the files to fetch from a repository listing: ``(files, target)``, where ``target``
    is the file to return, or the folder (``src.path``) for a PEFT adapter.

    Example:
        >>> pick_files(["README.md", "u/adapter_config.json", "u/adapter_model.safetensors"],
        ...            HubSource("o/r", None, "u"))
        (['u/adapter_config.json', 'u/adapter_model.safetensors'], 'u')
    """
    path = src.path
    if path and path in files:  # the path names one file
        folder = path.rsplit("/", 1)[0] if "/" in path else ""
        config = _join(folder, CONFIG_NAME)
        if Path(path).name.startswith("adapter_model") and config in files:
            return [config, path], path
        return [path], path
    prefix = f"{path}/" if path else ""
    here = sorted(f[len(prefix):] for f in files if f.startswith(prefix) and "/" not in
                  f[len(prefix):])
    if not here and not any(f.startswith(prefix) for f in files):
        where = f"path {path!r}" if path else "any file"
        raise HubNotFoundError(f"the repository has no {where} at this revision", path=str(src))
    if CONFIG_NAME in here:
        weights = next((w for w in PEFT_WEIGHTS if w in here), None)
        if weights is None:
            raise ConfigMismatchError(f"{CONFIG_NAME} without adapter_model.safetensors (or .bin) "
                                      "beside it", path=str(src))
        return [_join(path, CONFIG_NAME), _join(path, weights)], path
    if DIFFUSERS_WEIGHTS in here:
        return [_join(path, DIFFUSERS_WEIGHTS)], _join(path, DIFFUSERS_WEIGHTS)
    weights = [f for f in here if f.endswith(WEIGHT_SUFFIXES) and not f.startswith(".")]
    safes = [f for f in weights if f.endswith(".safetensors")] or weights
    if len(safes) == 1:
        return [_join(path, safes[0])], _join(path, safes[0])
    if len(safes) > 1:
        shown = ", ".join(safes[:4]) + (", ..." if len(safes) > 4 else "")
        raise InputNotFoundError(f"several weights files ({shown}); name one", path=str(src),
                                 hint=f"e.g. {HubSource(src.repo_id, src.revision, _join(path, safes[0]))}")
    subs = sorted({f[len(prefix):].split("/")[0] for f in files
                   if f.startswith(prefix) and "/" in f[len(prefix):]
                   and f.endswith((CONFIG_NAME, *WEIGHT_SUFFIXES))})
    hint = f"adapters may be in a subfolder: {', '.join(subs[:6])}" if subs else None
    raise InputNotFoundError(f"no adapter files ({CONFIG_NAME} or *.safetensors) here",
                             path=str(src), hint=hint)


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _list_files(src: HubSource) -> tuple[list[str], bool]:
    """The repository's files at the revision, and whether they come from the cache (offline,
    or the Hub cannot be reached)."""
    if offline():
        return _cached_files(src, reason=None), True
    from huggingface_hub import HfApi

    try:
        return list(HfApi().list_repo_files(src.repo_id, revision=src.revision)), False
    except Exception as e:  # noqa: BLE001 - every Hub failure is mapped to a named error
        if _is_connection_error(e):
            return _cached_files(src, reason=e), True
        raise hub_error(e, src) from e


def _cached_files(src: HubSource, reason: Exception | None) -> list[str]:
    from huggingface_hub import snapshot_download

    try:
        snap = Path(snapshot_download(src.repo_id, revision=src.revision, local_files_only=True))
    except Exception as e:  # noqa: BLE001
        raise hub_error(e, src, offline_reason=reason) from e
    return sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file())


def _download(src: HubSource, filename: str, cached: bool = False) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(src.repo_id, filename, revision=src.revision,
                                    local_files_only=cached or offline()))
    except Exception as e:  # noqa: BLE001
        raise hub_error(e, src, filename=filename) from e


def _is_connection_error(e: Exception) -> bool:
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):
        return True
    try:
        import httpx2 as httpx
    except ImportError:  # pragma: no cover - older huggingface_hub uses httpx/requests
        import httpx  # type: ignore[no-redef]
    return isinstance(e, (httpx.ConnectError, httpx.TimeoutException, ConnectionError))


def hub_error(e: Exception, src: HubSource | str, *, filename: str | None = None,
              offline_reason: Exception | None = None) -> Exception:
    """Map a huggingface_hub exception to a named :class:`HubError` (never quoting a token).

    Example:
        >>> hub_error(ValueError("x"), "hf://o/r")   # doctest: +SKIP
    """
    from huggingface_hub import errors as hf

    where = str(src)
    url = f"https://huggingface.co/{src.repo_id if isinstance(src, HubSource) else where}"
    if isinstance(e, hf.GatedRepoError):
        return GatedRepoAccessError("the repository is gated and this account has no access",
                                    path=where, hint=f"accept its conditions at {url} and "
                                    f"{_LOGIN_HINT}")
    if isinstance(e, hf.RepositoryNotFoundError):
        return HubNotFoundError("repository not found (or private)", path=where,
                                hint=f"check the name, or {_LOGIN_HINT}")
    if isinstance(e, hf.RevisionNotFoundError):
        rev = src.revision if isinstance(src, HubSource) else None
        return HubNotFoundError(f"revision {rev!r} not found", path=where)
    if isinstance(e, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)) or offline_reason:
        what = f"file {filename!r} is" if filename else "repository is"
        if offline():
            return HubOfflineError(f"HF_HUB_OFFLINE is set and the {what} not in the local "
                                   "Hub cache", path=where,
                                   hint="unset HF_HUB_OFFLINE to download it, or pull it first")
        return HubOfflineError(f"cannot reach the Hub and the {what} not in the local cache",
                               path=where, hint="check the network connection")
    if isinstance(e, hf.EntryNotFoundError):
        return HubNotFoundError(f"file {filename!r} not found in the repository", path=where)
    if isinstance(e, hf.LocalTokenNotFoundError):
        return HubError("no Hub token found", path=where, hint=_LOGIN_HINT)
    if isinstance(e, hf.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            return HubError(f"not authorised (HTTP {status})", path=where, hint=_LOGIN_HINT)
        return HubError(f"Hub request failed (HTTP {status}: {_first_line(e)})", path=where)
    if _is_connection_error(e):
        return HubOfflineError(f"cannot reach the Hub ({type(e).__name__})", path=where,
                               hint="check the network connection")
    return HubError(f"Hub request failed ({type(e).__name__}: {_first_line(e)})", path=where)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


# ---------------------------------------------------------------------------------------- push

# Outputs written inside record_writes() (the CLI pushes them for --push-to).
_WRITTEN: contextvars.ContextVar[list | None] = contextvars.ContextVar("lorakit_written",
                                                                       default=None)


@contextlib.contextmanager
def record_writes() -> Iterator[list[tuple[Path, dict[str, Any] | None]]]:
    """Within the block, collect ``(path, provenance)`` of every adapter :func:`lorakit.save`
    writes (the CLI uses it to push what a command wrote).

    Example:
        >>> with record_writes() as written:
        ...     note_written("out_dir", {"command": "lorakit resize ..."})
        >>> written
        [(PosixPath('out_dir'), {'command': 'lorakit resize ...'})]
    """
    token = _WRITTEN.set([])
    try:
        yield _WRITTEN.get()
    finally:
        _WRITTEN.reset(token)


def note_written(path: str | Path, provenance: dict[str, Any] | None = None) -> None:
    """Remember an output written inside :func:`record_writes` (a no-op outside it)."""
    written = _WRITTEN.get()
    if written is not None:
        written.append((Path(path), provenance))


@dataclass
class PushResult:
    """What a push uploaded (or, with ``dry_run``, would upload).

    Example:
        >>> files = [("a.safetensors", 10), ("README.md", 4)]
        >>> PushResult("me/lora", None, False, files, "---\\n", True).total_bytes
        14
    """

    repo_id: str
    revision: str | None
    private: bool
    files: list[tuple[str, int]]  # (path in the repository, bytes), the card last
    card: str
    dry_run: bool
    commit_url: str | None = None
    local: dict[str, str] = field(default_factory=dict, repr=False)  # path in repo -> local file

    @property
    def total_bytes(self) -> int:
        return sum(n for _, n in self.files)  # the card is the last entry

    def to_dict(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "revision": self.revision, "private": self.private,
                "dry_run": self.dry_run, "commit_url": self.commit_url,
                "files": [{"path": p, "bytes": n} for p, n in self.files]}


def push(folder: str | Path, repo_id: str, *, revision: str | None = None,
         private: bool = False, dry_run: bool = False,
         card: str | dict[str, Any] | None = None,
         commit_message: str | None = None, command: str | None = None) -> PushResult:
    """Upload an adapter (PEFT folder, weights file) or a collection folder to ``repo_id``.

    One commit holds the adapter files (hidden files such as batch records are left out) and a
    ``README.md`` model card. ``card`` is the full card text, or a provenance dict (``command`` or
    ``recipe``, ``sources``) to record in a generated card; by default the folder's own lorakit
    card is completed, or one is generated. The repository is created (``private`` applies then)
    and ``revision`` names a branch, created from ``main`` when missing. ``command`` is recorded
    when the adapter carries no provenance of its own (e.g. ``lorakit push`` of a third-party
    folder).

    Example:
        >>> push("resized", "me/gpt2-lora-r4", private=True, dry_run=True)   # doctest: +SKIP
    """
    path = Path(folder)
    if "/" not in repo_id:
        raise OptionError(f"push needs ORG/REPO, got {repo_id!r}", hint="e.g. me/my-lora")
    _validate_repo_id(repo_id, repo_id)
    if not path.exists():
        raise InputNotFoundError("no such file or folder to push", path=path)
    uploads = plan_upload(path)
    card_text = card if isinstance(card, str) else build_card(path, uploads, card,
                                                              command=command)
    files = [(p, Path(local).stat().st_size) for p, local in uploads.items()]
    files.append(("README.md", len(card_text.encode())))
    result = PushResult(repo_id, revision, private, files, card_text, dry_run, local=uploads)
    if dry_run:
        return result
    if offline():
        raise HubOfflineError("HF_HUB_OFFLINE is set; nothing can be uploaded", path=repo_id,
                              hint="unset HF_HUB_OFFLINE, or use --dry-run")
    result.commit_url = _upload(result, commit_message or f"Upload {path.name} with lorakit")
    return result


def _upload(result: PushResult, message: str) -> str | None:
    from huggingface_hub import CommitOperationAdd, HfApi

    repo = result.repo_id
    api = HfApi()  # token: HF_TOKEN or the stored login, never passed around or printed
    ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=local)
           for p, local in result.local.items()]
    ops.append(CommitOperationAdd(path_in_repo="README.md",
                                  path_or_fileobj=result.card.encode("utf-8")))
    try:
        api.create_repo(repo, private=result.private, exist_ok=True, repo_type="model")
        if result.revision and result.revision != "main":
            api.create_branch(repo, branch=result.revision, exist_ok=True)
        info = api.create_commit(repo, operations=ops, commit_message=message,
                                 revision=result.revision)
    except Exception as e:  # noqa: BLE001 - every Hub failure is mapped to a named error
        raise hub_error(e, f"{SCHEME}{repo}") from e
    return getattr(info, "commit_url", None)


def plan_upload(path: Path) -> dict[str, str]:
    """``{path in repo: local file}`` for a weights file, an adapter folder (its top-level files)
    or a collection folder (each adapter under its own name). Hidden files and an existing
    ``README.md`` (replaced by the card) are left out.

    Example:
        >>> plan_upload(Path("out_dir"))             # doctest: +SKIP
        {'adapter_config.json': 'out_dir/adapter_config.json', ...}
    """
    from lorakit.sources import collection_members, is_adapter_dir

    if path.is_file():
        return {path.name: str(path)}
    if is_adapter_dir(path):
        return {p.name: str(p) for p in _visible_files(path) if p.name != "README.md"}
    out: dict[str, str] = {}
    for member in collection_members(path):
        if member.is_file():
            out[member.name] = str(member)
        else:
            for p in _visible_files(member):
                out[f"{member.name}/{p.name}"] = str(p)
    if not out:
        raise InputNotFoundError("no adapter files to push (an adapter folder, a weights file or "
                                 "a folder of adapters)", path=path)
    return out


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def card_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """``(front matter, body)`` of a model card (``{}`` when it has none).

    Example:
        >>> card_front_matter("---\\nbase_model: gpt2\\n---\\n# hi\\n")
        ({'base_model': 'gpt2'}, '# hi\\n')
    """
    import yaml  # only where a card is read or written: 20 ms off every command's start

    m = re.match(r"---\s*\n(.*?)\n---\s*\n?", text, flags=re.DOTALL)
    if not m:
        return {}, text
    try:
        data = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError:
        return {}, text
    return (data if isinstance(data, dict) else {}), text[m.end():]


def build_card(path: Path, uploads: dict[str, str],
               provenance: dict[str, Any] | None = None, *, command: str | None = None) -> str:
    """The ``README.md`` pushed with ``path``: its own card completed, or a generated one.

    Front matter gets ``base_model`` (when known and shared), ``library_name: peft`` for PEFT
    output (``diffusers`` for diffusers files) and the tags ``lora``, ``lorakit`` and the format;
    the body records the command or recipe and the sources (from ``provenance``, else from what
    the writer recorded in the card or the safetensors metadata).

    Example:
        >>> print(build_card(Path("out_dir"), plan_upload(Path("out_dir"))))   # doctest: +SKIP
    """
    from lorakit.formats import load_adapter
    from lorakit.sources import collection_members, is_adapter_dir

    single = path.is_file() or is_adapter_dir(path)
    members = [path] if single else collection_members(path)
    adapters = [(m.name, load_adapter(m)) for m in members]
    readme = path / "README.md"
    existing = readme.read_text(encoding="utf-8") if path.is_dir() and readme.is_file() else ""
    fm, body = card_front_matter(existing)
    formats = sorted({str(a.source_format or "peft") for _, a in adapters})
    bases = sorted({str(a.base_model) for _, a in adapters if a.base_model})
    if len(bases) == 1:
        fm.setdefault("base_model", bases[0])
    if formats == ["peft"]:
        fm["library_name"] = "peft"
    elif formats == ["diffusers"]:
        fm.setdefault("library_name", "diffusers")
    tags = [str(t) for t in (fm.get("tags") or [])]
    fm["tags"] = tags + [t for t in ("lora", "lorakit", *formats) if t not in tags]
    if not body.strip():
        body = "# LoRA adapter\n\nWritten by [lorakit](https://pypi.org/project/lorakit/).\n"
    lines = [body.rstrip(), ""]
    if not single:
        lines += ["## Adapters", "", "| adapter | format | modules | ranks |", "|---|---|---|---|"]
        lines += [f"| `{name}` | {a.source_format} | {len(a.modules)} | "
                  f"{sorted(set(a.ranks().values()))} |" for name, a in adapters]
        lines.append("")
    prov = provenance
    if prov is None and single:
        prov = provenance_from_metadata(dict(getattr(adapters[0][1], "metadata", {}) or {}))
    if prov is None and command:
        prov = {"command": command, "sources": [str(path)]}
    if prov and "- command: `" not in body and "## Recipe" not in body:
        lines += _provenance_lines(prov)
    import yaml

    front = yaml.safe_dump(fm, sort_keys=False, allow_unicode=True).strip()
    return f"---\n{front}\n---\n\n" + "\n".join(lines).strip() + "\n"


def _provenance_lines(prov: dict[str, Any]) -> list[str]:
    lines = ["## Provenance", ""]
    if prov.get("tool"):
        lines.append(f"- tool: {prov['tool']}")
    if prov.get("command"):
        lines.append(f"- command: `{prov['command']}`")
    for s in prov.get("sources") or []:
        lines.append(f"- source: `{s}`")
    if prov.get("recipe"):
        lines += ["", "## Recipe", "", "```yaml", str(prov["recipe"]).rstrip(), "```"]
    return lines + [""]


def provenance_from_metadata(meta: dict[str, str]) -> dict[str, Any] | None:
    """The provenance lorakit records in kohya/diffusers safetensors metadata, if any."""
    raw = meta.get("lorakit.provenance")
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


__all__ = ["HubSource", "PushResult", "is_hub", "parse", "resolve", "pull", "push", "offline",
           "pick_files", "plan_upload", "build_card", "hub_error", "record_writes",
           "note_written"]
