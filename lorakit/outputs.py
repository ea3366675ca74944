"""The output contract, enforced here and nowhere else: how every command puts an output in place.

An output is a file or a folder. The rules (README, "Output safety"):

* A new output is written under a fresh temporary name beside it and renamed into place when it
  is complete. A failure (or Ctrl-C) removes the temporary and any parent folder this call made.
* ``force`` replaces only the files lorakit writes for that output. A file output is that file.
  A folder output is the files written into it this time (PEFT: ``adapter_model.safetensors``,
  ``adapter_config.json``, the ``README.md`` card; a kohya or diffusers output named as a folder:
  its one weights file), plus the other spelling of the PEFT weights file
  (``adapter_model.bin`` when ``adapter_model.safetensors`` is written, and back), which would
  otherwise disagree with the new one. A kohya or diffusers output named as a folder is refused
  when the folder holds another adapter's files (it would read as the other one). Every other entry of an existing folder is left as it was,
  and the folder keeps its mode and owner. A ``README.md`` that lorakit did not write (no
  link to lorakit, no ``lorakit`` tag) is kept, and the new card is not written (a notice says so).
* Changing the kind of an output (a file onto a folder or a folder onto a file) is refused even
  with ``force``; so is replacing a read-only file (no owner write bit) or a device, pipe or
  socket (a report may be one: ``--report /dev/stdout`` is written as a stream). Names ending in
  ``.lorakit.tmp`` are reserved for temporaries.
* A symbolic link at a file output's path is replaced by the new file: the file it points to is
  never written. A folder output may be a link to a folder, which then receives the files.
* Inside :func:`guard_inputs` (every CLI command) an output that is, holds or lies inside
  anything the command read is refused, ``force`` or not. Paths are compared resolved and by
  file identity (device, inode), so symlinks, hard-linked folders and case-insensitive file
  systems do not hide an input.
* Temporaries are named ``.<name, at most 64 bytes>.<8 hex of the name's sha256>.<random>.lorakit.tmp``
  (never an existing path, and short enough for a 255-byte output name) and hold an advisory
  lock (``flock``) while in use. The next write of the same output removes those a killed run
  left behind (unlocked ones only, so a concurrent run's temporary survives) and says so on
  stderr. Names starting with a dot are never read as adapters.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_output(d / "notes.txt") as tmp:
    ...     _ = tmp.write_text("hello")
    >>> (d / "notes.txt").read_text()
    'hello'
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.errors import LorakitError, OutputExistsError, OutputWriteError

try:  # advisory locks on temporaries (POSIX); without them no temporary is ever called stale
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

TEMP_SUFFIX = ".lorakit.tmp"
SHORT_NAME_BYTES = 64  # of the output's name kept in a temporary's name (NAME_MAX is 255)
CARD_NAME = "README.md"
CARD_MARKER = "[lorakit](https://pypi.org/project/lorakit/)"  # in every card lorakit writes
# the other spelling of a file that a folder output owns when it writes this one
SUPERSEDES = {"adapter_model.safetensors": ("adapter_model.bin",),
              "adapter_model.bin": ("adapter_model.safetensors",)}
_RANDOM = r"[a-z0-9_]{8}"  # tempfile's random part
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")

# Paths read inside guard_inputs(): no output may be, hold or lie inside one.
_INPUTS: contextvars.ContextVar[set[Path] | None] = contextvars.ContextVar("lorakit_inputs",
                                                                          default=None)


def notice(text: str) -> None:
    """One line on stderr about something lorakit did beside the task (a stale temporary
    removed, a README kept)."""
    print(f"lorakit: note: {text}", file=sys.stderr)


# ------------------------------------------------------------------------------------ inputs


@contextlib.contextmanager
def guard_inputs() -> Iterator[set[Path]]:
    """Within the block, remember every input read and refuse to write over or into any of them.

    The CLI runs each command inside it, so ``lorakit convert a.safetensors -o a.safetensors
    --force`` (or ``-o .`` on the folder holding the input) fails instead of replacing an input.

    Example:
        >>> with guard_inputs() as inputs:     # doctest: +SKIP
        ...     lorakit.load("a.safetensors")
    """
    token = _INPUTS.set(set())
    try:
        yield _INPUTS.get()
    finally:
        _INPUTS.reset(token)


def note_input(path: str | Path) -> None:
    """Record ``path`` (a file or a folder) as an input of the running command."""
    seen = _INPUTS.get()
    if seen is not None:
        with contextlib.suppress(OSError, RuntimeError):
            seen.add(Path(path).resolve())


def _ident(path: Path) -> tuple[int, int] | None:
    """``(device, inode)`` of an existing path (symlinks followed), else None."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _resolved(path: Path) -> Path:
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return Path(os.path.abspath(path))


class InputIndex:
    """Inputs to compare outputs against: by resolved path and by file identity.

    Example:
        >>> InputIndex([Path("/data/a")]).conflict(Path("/data"))
        ('holds', PosixPath('/data/a'))
    """

    def __init__(self, inputs: Iterable[Path]) -> None:
        self.exact: dict[object, Path] = {}
        self.ancestors: dict[object, Path] = {}
        self.folders: dict[object, Path] = {}
        for raw in inputs:
            p = _resolved(Path(raw))
            text = str(p)
            if text in self.exact:
                continue
            ident = _ident(p)
            for key in (text, ident):
                if key is not None:
                    self.exact.setdefault(key, p)
                    if os.path.isdir(text):
                        self.folders.setdefault(key, p)
            parent = os.path.dirname(text)
            while parent not in self.ancestors:  # inputs share parents: each is added once
                self.ancestors[parent] = p
                pid = _ident(Path(parent))
                if pid is not None:
                    self.ancestors.setdefault(pid, p)
                up = os.path.dirname(parent)
                if up == parent:
                    break
                parent = up

    def conflict(self, out: Path) -> tuple[str, Path] | None:
        """``("is" | "holds" | "lies inside", input)`` for an output that would touch an input."""
        r = _resolved(out)
        keys = [str(r), _ident(r)]
        for key in keys:
            if key is not None and key in self.exact:
                return "is", self.exact[key]
        for key in keys:
            if key is not None and key in self.ancestors:
                return "holds", self.ancestors[key]
        if not self.folders:
            return None
        parent = os.path.dirname(str(r))
        while True:
            for key in (parent, _ident(Path(parent))):
                if key is not None and key in self.folders:
                    return "lies inside", self.folders[key]
            up = os.path.dirname(parent)
            if up == parent:
                return None
            parent = up


def overlapping(path: Path, others: Iterable[Path]) -> Path | None:
    """The first of ``others`` that ``path`` is, holds or lies inside (existing or not: compared
    resolved, and by identity where both exist), else None.

    Example:
        >>> overlapping(Path("/o/a/r.json"), [Path("/o/b"), Path("/o/a")])
        PosixPath('/o/a')
    """
    r = str(_resolved(path))
    rid = _ident(Path(r))
    parents: dict[str, str] = {}  # resolved folder of each output's parent (usually one)
    for o in others:
        text = os.path.abspath(o)
        if os.path.islink(text):
            ro = str(_resolved(Path(text)))
        else:
            head, tail = os.path.split(text)
            if head not in parents:
                parents[head] = str(_resolved(Path(head)))
            ro = os.path.join(parents[head], tail)
        if r == ro or ro.startswith(r + os.sep) or r.startswith(ro + os.sep):
            return Path(o)
        if rid is not None and os.path.lexists(ro) and rid == _ident(Path(ro)):
            return Path(o)
    return None


def check_not_input(out: Path, inputs: Iterable[Path] | InputIndex | None = None, *,
                    what: str = "output") -> None:
    """Refuse ``out`` when it is, holds or lies inside an input (``inputs``, or those noted
    inside :func:`guard_inputs`)."""
    if isinstance(inputs, InputIndex):
        hit = inputs.conflict(out)
    else:
        seen = _INPUTS.get() if inputs is None else set(inputs)
        if not seen:
            return
        hit = InputIndex(sorted(seen)).conflict(out)
    if hit is not None:
        how, inp = hit
        target = "an input" if how == "is" else f"the input {inp}"
        raise OutputExistsError(f"{what} {how} {target} of this command; inputs are never "
                                "modified", path=out, hint="write to a new path")


# ----------------------------------------------------------------------------------- checks


def _lexists(p: Path) -> bool:
    return os.path.lexists(p)


def _is_dir(p: Path) -> bool:
    """A folder, or a symbolic link to one."""
    return p.is_dir()


def is_stream(p: Path) -> bool:
    """A device, pipe or socket (``/dev/null``, ``/dev/stdout``, a FIFO), links followed: never
    something lorakit replaces."""
    try:
        mode = os.stat(p).st_mode
    except (OSError, ValueError):
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _read_only(p: Path) -> bool:
    try:
        st = os.lstat(p)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and not st.st_mode & stat.S_IWUSR


def _name_of(out: Path) -> str:
    name = os.path.basename(os.path.abspath(out))
    if not name:
        raise OutputWriteError("an output needs a name (the file-system root is not one)",
                               path=out)
    if name.endswith(TEMP_SUFFIX):
        raise OutputWriteError(f"names ending in {TEMP_SUFFIX} are lorakit's temporaries",
                               path=out, hint="choose another name")
    return name


def check_output(out: str | Path, force: bool, *, is_dir: bool | None = None) -> None:
    """Refuse an output before anything is computed: one that is, holds or lies inside an
    input; an existing one without ``force``; a change of kind (``is_dir`` says which kind will
    be written; None: not known yet) or a read-only file, even with ``force``.

    Example:
        >>> check_output("/tmp/surely-new-output", False, is_dir=True)
    """
    out = Path(out)
    _name_of(out)
    check_not_input(out)
    if not _lexists(out):
        return
    if is_stream(out):
        raise OutputExistsError("output is a device, pipe or socket, not a file or folder; "
                                "lorakit never replaces one", path=out,
                                hint="write to a regular path")
    if is_dir is True and not _is_dir(out):
        raise OutputExistsError("output is a file, and this output is a folder; lorakit never "
                                "replaces one kind by the other, --force or not", path=out,
                                hint="remove it yourself or write elsewhere")
    if is_dir is False and _is_dir(out):
        raise OutputExistsError("output is a folder, and this output is a file; lorakit never "
                                "replaces one kind by the other, --force or not", path=out,
                                hint="name a file inside it, or remove it yourself")
    if not force:
        raise OutputExistsError("output already exists", path=out,
                                hint="pass --force to overwrite")
    if _read_only(out):
        raise OutputExistsError("output is read-only; --force never replaces a write-protected "
                                "file", path=out, hint="chmod u+w it first, or write elsewhere")


def check_report(path: str | Path, force: bool, *, outputs: Iterable[Path] = (),
                 inputs: Iterable[Path] | InputIndex | None = None) -> Path:
    """Refuse a ``--report FILE`` before any work: it follows the output rules (not an input,
    not existing without ``force``, never a folder), its folder must exist (it is not created),
    and it may not be, hold or lie inside one of the command's ``outputs``.

    Example:
        >>> check_report("/tmp/surely-new-report.json", False)
        PosixPath('/tmp/surely-new-report.json')
    """
    path = Path(path)
    if inputs is not None:
        check_not_input(path, inputs, what="report")
    other = overlapping(path, outputs)
    if other is not None:
        raise OutputExistsError(f"the report would overlap the output {other}", path=path,
                                hint="write the report elsewhere")
    if is_stream(path):  # /dev/stdout, a FIFO: written as a stream (write_text_output)
        return path
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputWriteError(f"the report's folder {parent} does not exist (lorakit does not "
                               "create it)", path=path, hint="create it first")
    check_output(path, force, is_dir=False)
    return path


# ------------------------------------------------------------------------------ temporaries


def _short(name: str) -> str:
    raw = name.encode("utf-8", "surrogateescape")[:SHORT_NAME_BYTES]
    return raw.decode("utf-8", "ignore") or "out"


def temp_affixes(out: Path) -> tuple[str, str]:
    """``(prefix, suffix)`` of the temporaries of ``out`` (for mkstemp / mkdtemp)."""
    name = _name_of(out)
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f".{_short(name)}.{digest}.", TEMP_SUFFIX


def _temp_pattern(out: Path) -> re.Pattern[str]:
    prefix, suffix = temp_affixes(out)
    return re.compile(re.escape(prefix) + _RANDOM + re.escape(suffix) + r"\Z")


_ANY_TEMP = re.compile(r"\..*\.[0-9a-f]{8}\." + _RANDOM + re.escape(TEMP_SUFFIX) + r"\Z", re.S)


def is_temp_name(name: str) -> bool:
    """A name :func:`new_temp` could have made (for some output)."""
    return bool(_ANY_TEMP.match(name))


def _lock(fd: int, block: bool) -> bool:
    if fcntl is None:  # pragma: no cover
        return not block  # a new temporary proceeds; none is ever taken for stale
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
    except OSError:
        return False
    return True


@dataclass
class Temp:
    """A fresh temporary file or folder beside an output, locked while this object is open."""

    path: Path
    fd: int | None = None

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None

    def discard(self) -> None:
        """Remove the temporary (whatever it holds) and release it."""
        p = self.path
        with contextlib.suppress(OSError):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            elif _lexists(p):
                p.unlink()
        self.release()


def temp_home(out: Path, is_dir: bool) -> Path:
    """Where the temporaries of ``out`` go: inside it when it is an existing folder that the new
    files go into (same file system, and ``-o .`` needs no writable parent), else beside it."""
    if is_dir and _is_dir(out):
        return out
    return Path(os.path.abspath(out)).parent


def new_temp(out: Path, *, is_dir: bool, parent: Path | None = None) -> Temp:
    """A fresh, locked temporary for ``out`` in ``parent`` (default: :func:`temp_home`)."""
    prefix, suffix = temp_affixes(out)
    where = parent if parent is not None else temp_home(out, is_dir)
    for _ in range(100):
        if is_dir:
            path = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=where))
            fd = os.open(path, os.O_RDONLY)
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=where)
            path = Path(name)
        _lock(fd, block=True)
        # a stale-temporary sweep may have taken it between its creation and the lock
        if _ident(path) == _fd_ident(fd) and not path.is_symlink():
            return Temp(path, fd)
        os.close(fd)
    raise OutputWriteError("cannot create a temporary beside the output", path=out)


def _fd_ident(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def remove_stale(out: Path, *, parent: Path | None = None) -> list[Path]:
    """Remove the temporaries of ``out`` that killed runs left (unlocked ones: never those of a
    run still writing); return them. Each removal is reported with :func:`notice`."""
    homes = [parent] if parent is not None else list(dict.fromkeys(
        [Path(os.path.abspath(out)).parent] + ([Path(out)] if _is_dir(Path(out)) else [])))
    pattern = _temp_pattern(out)
    removed: list[Path] = []
    for where in homes:
        try:
            names = sorted(n for n in os.listdir(where) if pattern.match(n))
        except OSError:
            continue
        for name in names:
            p = where / name
            if remove_if_unlocked(p):
                removed.append(p)
                notice(f"removed {p}, a temporary an interrupted run left for {out}")
    return removed


def remove_if_unlocked(p: Path) -> bool:
    if fcntl is None:  # pragma: no cover - no way to tell a live temporary from a stale one
        return False
    try:
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode) or not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            return False  # not something lorakit creates
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    try:
        if not _lock(fd, block=False) or _fd_ident(fd) != (st.st_dev, st.st_ino):
            return False
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(p)
        else:
            p.unlink()
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- putting in place


def default_mode(is_dir: bool) -> int:
    """The mode a new file or folder gets here (0o644 / 0o755 under the usual umask 022)."""
    mask = _umask()
    return (0o777 if is_dir else 0o666) & ~mask


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError):  # Linux: read it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _is_lorakit_card(p: Path) -> bool:
    """A model card lorakit wrote: its link to lorakit, or the ``lorakit`` tag in the front
    matter (PEFT, transfer and zoo cards carry both)."""
    try:
        with open(p, "rb") as f:
            head = f.read(8192)
    except OSError:
        return False
    if CARD_MARKER.encode() in head:
        return True
    text = head.decode("utf-8", "replace")  # or the "lorakit" tag in the card's front matter
    if not text.startswith("---"):
        return False
    front = text[3:].split("\n---", 1)[0]
    return any(line.strip() == "- lorakit" for line in front.splitlines())


@dataclass
class InstallPlan:
    """What :func:`install` does with a folder output: entries put in place (relative names),
    an existing README.md kept, files of the output's other spelling removed."""

    put: list[str] = field(default_factory=list)
    keep: list[str] = field(default_factory=list)
    drop: list[str] = field(default_factory=list)


def plan_install(tmp: Path, out: Path) -> InstallPlan:
    """Check that the new folder ``tmp`` can be merged into the existing folder ``out`` (kinds
    agree entry by entry, nothing read-only is replaced, no second adapter in one folder) and
    say what :func:`install` will do."""
    _check_one_adapter(tmp, out)
    plan = InstallPlan()
    _plan_entries(tmp, out, "", plan)
    return plan


def _adapter_entries(folder: Path) -> list[str]:
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return sorted(n for n in names if not n.startswith(".") and (
        n == "adapter_config.json" or n.endswith(WEIGHT_SUFFIXES)) and (folder / n).is_file())


def _check_one_adapter(tmp: Path, out: Path) -> None:
    """A kohya or diffusers output named as a folder (one weights file, no config) may not go
    into a folder that already holds another adapter's files: the folder would then read as the
    other adapter, or as neither (name the output file instead)."""
    new = _adapter_entries(tmp)
    if len(new) != 1 or new[0] == "adapter_config.json":
        return
    others = [n for n in _adapter_entries(out) if n != new[0]]
    if others:
        raise OutputExistsError(
            f"the folder already holds adapter files ({', '.join(others[:3])}); writing "
            f"{new[0]} beside them would leave two adapters in one folder", path=out,
            hint=f"name the output file, e.g. {out / new[0]}")


def _plan_entries(tmp: Path, out: Path, rel: str, plan: InstallPlan) -> None:
    names = sorted(os.listdir(tmp))
    for name in names:
        new, old = tmp / name, out / name
        sub = f"{rel}{name}"
        if new.is_dir():
            if _lexists(old) and not (old.is_dir() and not old.is_symlink()):
                raise OutputExistsError("the output holds a file where lorakit writes a folder",
                                        path=old, hint="remove it yourself or write elsewhere")
            if _lexists(old):
                _plan_entries(new, old, f"{sub}/", plan)
                continue
            plan.put.append(sub)
            continue
        if _lexists(old) and old.is_dir() and not old.is_symlink():
            raise OutputExistsError("the output holds a folder where lorakit writes a file",
                                    path=old, hint="remove it yourself or write elsewhere")
        if is_stream(old):
            raise OutputExistsError("the output holds a device, pipe or socket where lorakit "
                                    "writes a file", path=old)
        if _read_only(old):
            raise OutputExistsError("output file is read-only; --force never replaces a "
                                    "write-protected file", path=old,
                                    hint="chmod u+w it first, or write elsewhere")
        if name == CARD_NAME and _lexists(old) and not _is_lorakit_card(old):
            plan.keep.append(sub)
            continue
        plan.put.append(sub)
        for other in SUPERSEDES.get(name, ()):
            gone = out / other
            if other not in names and _lexists(gone):
                if gone.is_dir() and not gone.is_symlink():
                    raise OutputExistsError(f"the output holds a folder named {other}, where the "
                                            "other spelling of its weights would be", path=gone)
                if _read_only(gone):
                    raise OutputExistsError("output file is read-only; --force never replaces "
                                            "a write-protected file", path=gone)
                plan.drop.append(f"{rel}{other}")


def _set_modes(tmp: Path) -> None:
    """New entries get the usual modes (mkdtemp makes 0o700 folders, mkstemp 0o600 files)."""
    dmode, fmode = default_mode(True), default_mode(False)
    if tmp.is_dir():
        tmp.chmod(dmode)
        for p in tmp.rglob("*"):
            if not p.is_symlink():
                p.chmod(dmode if p.is_dir() else fmode)
    else:
        tmp.chmod(fmode)


def _rename_no_clobber(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` only if ``dst`` does not exist (a file: link then unlink; a
    folder: rename, which only replaces an empty folder)."""
    if src.is_dir():
        if _lexists(dst):
            raise OutputExistsError("output appeared while writing", path=dst,
                                    hint="pass --force to overwrite")
        os.rename(src, dst)
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise OutputExistsError("output appeared while writing", path=dst,
                                hint="pass --force to overwrite") from None
    except OSError:  # no hard links here (some network or FAT file systems)
        if _lexists(dst):
            raise OutputExistsError("output appeared while writing", path=dst,
                                    hint="pass --force to overwrite") from None
        os.rename(src, dst)
        return
    os.unlink(src)


def _keep_mode(new: Path, old: Path) -> None:
    """A replaced file keeps its permission bits (a private output stays private)."""
    try:
        st = os.lstat(old)
    except OSError:
        return
    if stat.S_ISREG(st.st_mode):
        os.chmod(new, stat.S_IMODE(st.st_mode))


def install(tmp: Path, out: Path, *, force: bool, is_dir: bool,
            plan: InstallPlan | None = None) -> InstallPlan:
    """Put the complete temporary ``tmp`` in place as ``out`` under the output rules; return
    what was done. The caller removes whatever is left of ``tmp``.

    Example:
        >>> install(Path("/tmp/.x.tmp"), Path("/tmp/x"), force=False, is_dir=False)  # doctest: +SKIP
    """
    _set_modes(tmp)
    if not _lexists(out):
        _rename_no_clobber(tmp, out)
        return InstallPlan(put=sorted(os.listdir(out)) if is_dir else [out.name])
    check_output(out, force, is_dir=is_dir)  # kind, read-only, force, inputs: again, now
    if not is_dir:
        _keep_mode(tmp, out)
        os.replace(tmp, out)  # a symlink at ``out`` is replaced, its target never written
        return InstallPlan(put=[out.name])
    plan = plan or plan_install(tmp, out)
    # weights last: every other file is in place before the new weights are
    order = sorted(plan.put, key=lambda r: (Path(r).suffix in (".safetensors", ".bin"), r))
    for rel in order:
        new, old = tmp / rel, out / rel
        if new.is_dir():
            _rename_no_clobber(new, old)
        else:
            _keep_mode(new, old)
            os.replace(new, old)
    for rel in plan.drop:
        (out / rel).unlink()
    for rel in plan.keep:
        notice(f"kept {out / rel}: lorakit did not write it, so the new model card was not "
               "written")
    return plan


@contextlib.contextmanager
def atomic_output(out: str | Path, *, force: bool = False, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; put it in place (:func:`install`) when the block
    succeeds.

    On any exception the temporary (and any parent folder this call created) is removed and
    ``out`` is untouched. An ``OSError`` (disk full, permissions) becomes
    :class:`OutputWriteError` naming ``out``; a :class:`LorakitError` raised about a file inside
    the temporary path is re-pointed at the matching path under ``out``.

    Example:
        >>> with atomic_output("/tmp/doc-example-dir", force=True, is_dir=True) as tmp:
        ...     _ = (tmp / "a.txt").write_text("a")
    """
    out = Path(out)
    check_output(out, force, is_dir=is_dir)
    parent = Path(os.path.abspath(out)).parent
    created: list[Path] = []
    try:
        created = make_parents(parent)
        remove_stale(out)
        temp = new_temp(out, is_dir=is_dir)
    except OSError as e:
        remove_dirs(created)
        raise OutputWriteError(f"cannot create the output ({e.strerror or e})", path=out) from e
    except BaseException:
        remove_dirs(created)
        raise
    try:
        yield temp.path
        install(temp.path, out, force=force, is_dir=is_dir)
    except BaseException as e:
        temp.discard()
        remove_dirs(created)
        if isinstance(e, LorakitError):
            repoint_error(e, temp.path, out)
        elif isinstance(e, OSError):
            raise OutputWriteError(f"cannot write the output ({e.strerror or e})",
                                   path=out) from e
        elif isinstance(e, UnicodeError):  # text that cannot be encoded (a card, metadata)
            raise OutputWriteError(f"cannot write the output ({type(e).__name__}: {e})",
                                   path=out) from e
        raise
    else:
        temp.discard()  # an emptied folder after a merge into an existing one
    finally:
        temp.release()


def write_text_output(path: str | Path, text: str, *, force: bool = False) -> Path:
    """Write a text file (a report) under the output rules, atomically.

    Example:
        >>> write_text_output("/tmp/doc-example.json", "{}\\n", force=True)
        PosixPath('/tmp/doc-example.json')
    """
    path = Path(path)
    if is_stream(path):  # --report /dev/stdout: a stream is written, never replaced
        check_not_input(path, what="report")
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as e:
            raise OutputWriteError(f"cannot write ({e.strerror or e})", path=path) from e
        return path
    with atomic_output(path, force=force) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def make_parents(parent: Path) -> list[Path]:
    """Create ``parent`` (and its missing ancestors); return the folders created, deepest first."""
    missing = []
    p = parent
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    parent.mkdir(parents=True, exist_ok=True)
    return missing


def remove_dirs(created: list[Path]) -> None:
    """Remove folders :func:`make_parents` created, if they are still empty."""
    for d in created:  # deepest first; stop at the first that is not empty
        try:
            d.rmdir()
        except OSError:
            break


def repoint_error(e: LorakitError, tmp: Path, out: Path) -> None:
    """Name the user's output instead of the temporary path in an error raised while writing."""
    if e.path is None:
        return
    t = str(tmp)
    if e.path == t or e.path.startswith(t + os.sep):
        e.path = str(out) + e.path[len(t):]
        e.args = (e.message,)


__all__ = ["guard_inputs", "note_input", "check_output", "check_report", "check_not_input",
           "atomic_output", "install", "plan_install", "new_temp", "remove_stale",
           "write_text_output", "InputIndex", "InstallPlan", "Temp", "notice", "overlapping",
           "remove_if_unlocked", "temp_home", "is_temp_name", "is_stream"]
