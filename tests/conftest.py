"""Shared fixtures: the real third-party adapters in ``../shared/real_adapters``.

The adapters are read in place (never copied into the repository). When the folder is absent (a
user's fresh clone), every test that needs it is skipped with :data:`REAL_ADAPTERS_REASON`.

Parametrise over MANIFEST.json so that a new folder is covered without code changes::

    @pytest.mark.parametrize("entry", manifest_params())          # skips with the reason
    @pytest.mark.parametrize("entry", manifest_entries(), ids=entry_id)   # [] when absent

Tests that name one adapter call ``require_real("name")`` (its folder, or a skip). The location can
be overridden with ``LORAKIT_REAL_ADAPTERS``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: with pytest-xdist on few cores, spinning workers
# slow each other down several-fold (the Makefile sets the same). Must precede the torch import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# numpy's OpenBLAS threads spin while idle; the tests' dense references are small matrices, so one
# thread is as fast and leaves the cores to torch and to other workers (measured: half the CPU
# time serially, a third under pytest-xdist -n 2 on 2 cores).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# Under pytest-xdist, share the cores between workers instead of one pool per worker per core.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, _threads)

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# LORAKIT_REAL_ADAPTERS points elsewhere (or at a missing folder, to check the skips)
REAL_ADAPTERS = Path(os.environ.get("LORAKIT_REAL_ADAPTERS")
                     or ROOT.parent / "shared" / "real_adapters")
MANIFEST = REAL_ADAPTERS / "MANIFEST.json"
REAL_ADAPTERS_REASON = (
    f"real third-party adapters not available: {MANIFEST} is missing "
    "(they live in ../shared/real_adapters beside the repository, not in it)")


@lru_cache(maxsize=1)
def _manifest() -> tuple[dict, ...]:
    if not MANIFEST.is_file():
        return ()
    return tuple(json.loads(MANIFEST.read_text(encoding="utf-8")))


def real_adapters_available() -> bool:
    return bool(_manifest())


def manifest_entries() -> list[dict]:
    """Every MANIFEST.json entry (a dict per adapter folder), or ``[]`` when absent."""
    return [dict(e) for e in _manifest()]


def manifest_params(where: Callable[[dict], bool] | None = None) -> list:
    """:func:`manifest_entries` (those ``where`` accepts) as ``pytest.param`` values with ids; when
    the adapters are absent, one placeholder that is skipped with :data:`REAL_ADAPTERS_REASON`
    (instead of pytest's bare "got empty parameter set")."""
    entries = [e for e in manifest_entries() if where is None or where(e)]
    if not _manifest():
        return [pytest.param(None, id="no-real-adapters",
                             marks=pytest.mark.skip(reason=REAL_ADAPTERS_REASON))]
    return [pytest.param(e, id=e["name"]) for e in entries]


def manifest_entry(name: str) -> dict:
    """The MANIFEST entry of one adapter; skips the calling test when it is not available."""
    for e in _manifest():
        if e["name"] == name:
            return dict(e)
    pytest.skip(REAL_ADAPTERS_REASON if not _manifest() else f"{name} is not in {MANIFEST}")


def entry_id(entry: dict) -> str:
    """Readable test id for a MANIFEST entry."""
    return entry["name"]


def require_real(name: str | None = None) -> Path:
    """The real adapters root (or one adapter folder); skip with a clear reason when absent."""
    if not real_adapters_available():
        pytest.skip(REAL_ADAPTERS_REASON)
    if name is None:
        return REAL_ADAPTERS
    path = REAL_ADAPTERS / name
    if not path.exists():
        pytest.skip(f"real adapter {name} not found in {REAL_ADAPTERS}")
    return path


def real_adapter(name: str) -> Path:
    """Path of one real adapter folder (skips when absent)."""
    return require_real(name)


def weights_path(entry: dict) -> Path:
    """The weights file of a MANIFEST entry."""
    return require_real(entry["name"]) / entry["weights_file"]


@pytest.fixture(scope="session")
def real_adapters() -> Path:
    """Root folder of the real adapters; the test is skipped when it is absent."""
    return require_real()


@pytest.fixture(scope="session")
def manifest(real_adapters: Path) -> dict[str, dict]:
    """``{name: MANIFEST entry}`` for every real adapter (skips when absent)."""
    return {e["name"]: e for e in manifest_entries()}
