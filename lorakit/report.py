"""Tables and JSON for command results (rich tables on a terminal, plain text otherwise).

Example:
    >>> from rich.console import Console
    >>> render_table("t", ["a", "b"], [[1, 2]], Console(width=40, record=True))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # rich is imported where a table is drawn: commands that print none start faster
    from rich.console import Console


def fmt_num(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x == 0 or (1e-3 <= abs(x) < 1e6):
            return f"{x:.{digits}g}"
        return f"{x:.{digits - 1}e}" if math.isfinite(x) else str(x)
    return str(x)


def render_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                 console: Console) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_lines=False)
    for c in columns:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*[fmt_num(v) for v in r])
    console.print(table)


def _energy_at(energy: list[float] | None, ks: Sequence[int]) -> str:
    if energy is None:  # spectra skipped (--no-spectra)
        return "-"
    parts = []
    for k in ks:
        if 1 <= k <= len(energy):
            parts.append(f"{k}:{energy[k - 1]:.3f}")
    return " ".join(parts)


def energy_marks(rank: int) -> list[int]:
    """Ranks at which the table shows the kept energy: 1, 2, 4, ... up to r."""
    ks, k = [], 1
    while k < rank:
        ks.append(k)
        k *= 2
    ks.append(rank)
    return ks


def print_inspect(info: dict[str, Any], console: Console, *, max_rows: int = 60) -> None:
    """One summary and one per-module table for an inspected adapter."""
    summary = [
        ["source", info["source"]], ["format", f"{info['format']} ({info['layout']})"],
        ["base model", info["base_model"]], ["modules", info["n_modules"]],
        ["ranks", ", ".join(map(str, info["ranks"]))],
        ["alphas", ", ".join(fmt_num(a) for a in info["alphas"])],
        ["scales", ", ".join(fmt_num(s) for s in info["scales"])],
        ["LoRA params", info["params"]], ["extra tensors", len(info["extra_tensors"])],
        ["extra params", info["extra_params"]], ["dtypes", ", ".join(info["dtypes"])],
        ["rsLoRA / DoRA", f"{info['rslora']} / {info['dora']}"],
    ]
    if info["components"]:
        summary.append(["components", ", ".join(info["components"])])
    if info.get("family"):
        summary.append(["family", info["family"]])
        summary.append(["coverage", info["coverage_line"]])
    if info.get("ignored_keys"):
        summary.append(["ignored keys", f"{len(info['ignored_keys'])}: "
                        + ", ".join(info["ignored_keys"][:6])])
    if info.get("lycoris_types"):  # issue 16b
        summary.append(["LyCORIS types", ", ".join(info["lycoris_types"])])
    summary.extend(["note", n] for n in info.get("notes") or [])
    render_table("adapter", ["field", "value"], summary, console)
    rows = []
    lyco = bool(info.get("lycoris_types"))  # issue 16b: a type column for LyCORIS files
    for m in info["modules"][:max_rows]:
        rows.append([m["key"], *([m.get("lycoris_type") or "lora"] if lyco else []), m["rank"],
                     m["alpha"], m["scale"], m["params"], m["dtype"], m["effective_rank"],
                     m["norm"], _energy_at(m["energy"], energy_marks(m["rank"]))])
    render_table("modules (energy = fraction of ||scale*B@A||^2 kept at rank k)",
                 ["module", *(["type"] if lyco else []), "r", "alpha", "scale", "params", "dtype",
                  "eff. rank", "||delta||", "energy k:frac"], rows, console)
    hidden = len(info["modules"]) - max_rows
    if hidden > 0:
        console.print(f"... {hidden} more modules (use --json for all)")


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=str)


def print_resize(info: dict[str, Any], console: Console, *, max_rows: int = 40,
                 action: str = "resize") -> None:
    """The per-module resize (or squeeze) report: kept rank, energy kept, relative error."""
    mods = info.get("modules", [])
    rows = [[m["key"], m.get("rank_before"), m.get("rank_after"), m.get("energy_kept"),
             m.get("rel_error")] for m in mods[:max_rows]]
    render_table(f"{action} {info['source']} -> {info['output']}",
                 ["module", "r before", "r after", "energy kept", "rel. error"], rows, console)
    if len(mods) > max_rows:
        console.print(f"... {len(mods) - max_rows} more modules (use --json for all)")
    totals = {k: v for k, v in info.items() if k not in ("modules", "source", "output")}
    if totals:
        render_table("totals", ["field", "value"], [[k, v] for k, v in totals.items()], console)
