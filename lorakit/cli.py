"""The ``lorakit`` command line: a thin click layer over the Python API.

Every command maps a :class:`~lorakit.errors.LorakitError` to one line on stderr and exit code 1
(``LORAKIT_DEBUG=1`` shows the traceback); usage errors exit 2.

Example:
    $ lorakit inspect ../shared/real_adapters/gpt2_r4_jhess --json
    $ lorakit convert adapter_dir --to kohya -o lora.safetensors
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import Any

import click
from rich.console import Console

from lorakit.errors import LorakitError

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _console(quiet: bool = False) -> Console:
    return Console(quiet=quiet, soft_wrap=False, width=None if sys.stdout.isatty() else 160)


def provenance(sources: list[str]) -> dict[str, Any]:
    """What produced an output: the command line and its sources (recorded in every write)."""
    from lorakit import __version__

    argv = ["lorakit", *sys.argv[1:]]
    return {"tool": f"lorakit {__version__}", "command": shlex.join(argv), "sources": sources}


def parse_dtype(name: str | None):
    import torch

    if name is None:
        return None
    key = DTYPES.get(name.lower())
    if key is None:
        raise click.BadParameter(f"unknown dtype {name!r} (use float32, float16 or bfloat16)")
    return getattr(torch, key)


def common_write_options(f):
    f = click.option("--force", is_flag=True, help="Overwrite an existing output.")(f)
    f = click.option("--dtype", default=None, help="Output dtype (float32|float16|bfloat16); "
                     "default: the input's.")(f)
    f = click.option("--quiet", is_flag=True, help="No progress or tables.")(f)
    f = click.option("--json", "as_json", is_flag=True, help="Machine-readable result.")(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lorakit")
def cli() -> None:
    """lorakit: inspect, convert, merge, compose, resize, extract and transfer LoRA adapters."""


@cli.command("inspect")
@click.argument("paths", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--no-spectra", is_flag=True, help="Skip singular values (faster).")
@click.option("--max-rows", default=60, show_default=True, help="Module rows per table.")
def inspect_cmd(paths: tuple[str, ...], as_json: bool, no_spectra: bool, max_rows: int) -> None:
    """Show format, modules, ranks, alphas, scales and exact spectra of adapters."""
    from lorakit.api import load
    from lorakit.inspect import inspect_adapter
    from lorakit.report import dumps, print_inspect

    infos = [inspect_adapter(load(p), spectra=not no_spectra) for p in paths]
    if as_json:
        click.echo(dumps(infos if len(infos) > 1 else infos[0]))
        return
    console = _console()
    for info in infos:
        print_inspect(info, console, max_rows=max_rows)


@cli.command("convert")
@click.argument("src")
@click.option("--to", "to", required=True, type=click.Choice(["peft", "diffusers", "kohya"]),
              help="Target format.")
@click.option("-o", "--output", "out", required=True, help="Output folder (PEFT) or file.")
@click.option("--component", default=None,
              help="Diffusion component to keep or assume (unet, text_encoder, transformer...).")
@common_write_options
def convert_cmd(src: str, to: str, out: str, component: str | None, force: bool,
                dtype: str | None, quiet: bool, as_json: bool) -> None:
    """Convert an adapter between PEFT, diffusers and kohya layouts (updates are unchanged)."""
    from lorakit.api import convert, load, save
    from lorakit.report import dumps

    adapter = load(src)
    converted = convert(adapter, to, component=component)
    written = save(converted, out, to, force=force, dtype=parse_dtype(dtype),
                   provenance=provenance([src]))
    result = {"source": src, "output": str(written), "format": to,
              "modules": len(converted.modules)}
    if as_json:
        click.echo(dumps(result))
    elif not quiet:
        click.echo(f"wrote {written} ({to}, {len(converted.modules)} modules)")


def rank_policy_options(f):
    """The RANK-POLICY options every compressing command shares (exactly one may be given)."""
    opts = [
        click.option("--rank", type=int, default=None, help="Fixed rank."),
        click.option("--energy", type=float, default=None,
                     help="Keep the minimal rank holding this fraction of ||delta||_F^2."),
        click.option("--sv-ratio", type=float, default=None,
                     help="kohya: keep singular values >= s_max / X (minimal rank)."),
        click.option("--sv-fro", type=float, default=None,
                     help="kohya: minimal rank keeping this fraction of the Frobenius norm."),
        click.option("--sv-cumulative", type=float, default=None,
                     help="kohya: minimal rank keeping this fraction of sum(s)."),
        click.option("--threshold", type=float, default=None,
                     help="Keep singular values above this absolute value."),
        click.option("--budget", type=str, default=None,
                     help="Global parameter budget: a count (e.g. 2000000) or a fraction (0.5)."),
        click.option("--conv-rank", type=int, default=None, help="Rank for conv modules."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def policy_from(kwargs: dict[str, Any], default_required: bool = True):
    """Build a RankPolicy from the CLI's rank-policy options (popping them from kwargs)."""
    from lorakit.lowrank import RankPolicy

    names = ("rank", "energy", "sv_ratio", "sv_fro", "sv_cumulative", "threshold", "budget",
             "conv_rank")
    vals = {n: kwargs.pop(n, None) for n in names}
    budget = vals["budget"]
    if budget is not None:
        try:
            vals["budget"] = float(budget) if ("." in budget or "e" in budget.lower()) \
                else int(budget)
        except ValueError as e:
            raise click.BadParameter(f"--budget {budget!r} is neither a count nor a fraction") \
                from e
    if not default_required and all(v is None for k, v in vals.items() if k != "conv_rank"):
        return None
    return RankPolicy.from_options(**vals)


def device_option(f):
    return click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                        show_default=True, help="Where the linear algebra runs.")(f)


@cli.command("resize")
@click.argument("sources", nargs=-1, required=True)
@click.option("-o", "--output", "out", required=True,
              help="Output path (a folder when several sources are given).")
@click.option("--to", "to", type=click.Choice(["peft", "diffusers", "kohya"]), default=None,
              help="Output format (default: the input's).")
@rank_policy_options
@device_option
@click.option("--report", "report_file", default=None, help="Write the per-module report (JSON).")
@common_write_options
def resize_cmd(sources: tuple[str, ...], out: str, to: str | None, device: str,
               report_file: str | None, force: bool, dtype: str | None, quiet: bool,
               as_json: bool, **policy_kw: Any) -> None:
    """Resize adapters to a smaller rank by the exact SVD of each update (from the factors)."""
    from pathlib import Path

    from lorakit.api import load, save
    from lorakit.compress.resize import resize
    from lorakit.report import dumps, print_resize

    policy = policy_from(policy_kw)
    many = len(sources) > 1
    results = []
    for src in sources:
        adapter = load(src)
        target = Path(out) / Path(src).name if many else Path(out)
        progress = None if quiet or as_json or not sys.stderr.isatty() else _progress_cb()
        resized, report = resize(adapter, policy, device=device, progress=progress)
        written = save(resized, target, to, force=force, dtype=parse_dtype(dtype),
                       provenance=provenance([src]))
        info = {"source": src, "output": str(written), **report.to_dict()}
        results.append(info)
        if not (quiet or as_json):
            print_resize(info, _console())
    if report_file:
        Path(report_file).write_text(dumps(results if many else results[0]))
    if as_json:
        click.echo(dumps(results if many else results[0]))


@cli.command("merge")
@click.argument("sources", nargs=-1, required=True)
@click.option("--method", required=True, help="Merge method (see `lorakit methods`).")
@click.option("--weights", default=None, help="Comma-separated weights, e.g. 1,1,-0.5.")
@click.option("-o", "--output", "out", required=True, help="Output path.")
@click.option("--to", "to", type=click.Choice(["peft", "diffusers", "kohya"]), default=None,
              help="Output format (default: the first input's).")
@click.option("--intersect", is_flag=True, help="Keep only modules every adapter has.")
@click.option("--extras", type=click.Choice(["error", "first", "drop"]), default="error",
              show_default=True, help="Non-LoRA tensors (heads): refuse if they differ, keep the "
              "first adapter's, or drop them.")
@click.option("--option", "method_options", multiple=True, metavar="NAME=VALUE",
              help="A method option, e.g. --option density=0.2 (repeatable).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random methods.")
@rank_policy_options
@device_option
@common_write_options
def merge_cmd(sources: tuple[str, ...], method: str, weights: str | None, out: str,
              to: str | None, intersect: bool, extras: str, method_options: tuple[str, ...],
              seed: int, device: str, force: bool, dtype: str | None, quiet: bool,
              as_json: bool, **policy_kw: Any) -> None:
    """Merge adapters into one on the full update sum_i w_i * scale_i * B_i @ A_i."""
    from lorakit.api import load, save
    from lorakit.merge import merge
    from lorakit.report import dumps

    if len(sources) < 2 and method not in ("linear", "task_arithmetic", "svd"):
        raise click.BadParameter("merge needs at least two sources")
    policy = policy_from(policy_kw, default_required=False)
    values = dict(_parse_option(o) for o in method_options)
    adapters = [load(s) for s in sources]
    merged = merge(adapters, method, weights, policy=policy, intersect=intersect,
                   extras=extras, device=device, seed=seed, **values)
    prov = provenance(list(sources))
    prov.update({"method": method, "weights": weights, "options": values})
    written = save(merged, out, to, force=force, dtype=parse_dtype(dtype), provenance=prov)
    result = {"sources": list(sources), "method": method, "output": str(written),
              "modules": len(merged.modules),
              "ranks": sorted(set(merged.ranks().values()))}
    if as_json:
        click.echo(dumps(result))
    elif not quiet:
        click.echo(f"merged {len(sources)} adapters with {method} -> {written} "
                   f"({len(merged.modules)} modules, ranks {result['ranks']})")


def _parse_option(text: str) -> tuple[str, Any]:
    import yaml

    name, sep, value = text.partition("=")
    if not sep or not name:
        raise click.BadParameter(f"--option {text!r} must be NAME=VALUE")
    return name.strip().replace("-", "_"), yaml.safe_load(value)


@cli.command("extract")
@click.option("--base", required=True, help="Base checkpoint (safetensors file or folder).")
@click.option("--tuned", required=True, help="Fine-tuned checkpoint (same layout).")
@click.option("-o", "--output", "out", required=True, help="Output PEFT folder.")
@click.option("--max-rank", type=int, default=256, show_default=True,
              help="Triplets computed per module for non-fixed policies.")
@click.option("--non-lora", type=click.Choice(["skip", "save"]), default="skip",
              show_default=True, help="Norms, biases and other non-2-D tensors: skip or save.")
@click.option("--seed", type=int, default=0, show_default=True)
@rank_policy_options
@device_option
@common_write_options
def extract_cmd(base: str, tuned: str, out: str, max_rank: int, non_lora: str, seed: int,
                device: str, force: bool, dtype: str | None, quiet: bool, as_json: bool,
                **policy_kw: Any) -> None:
    """Extract a LoRA from a full fine-tune (tuned - base), one tensor at a time."""
    from pathlib import Path

    from lorakit.api import save
    from lorakit.compress.extract import extract
    from lorakit.io import check_output
    from lorakit.report import dumps

    check_output(Path(out), force)
    policy = policy_from(policy_kw)
    adapter, report = extract(base, tuned, policy, max_rank=max_rank, non_lora=non_lora,
                              seed=seed, device=device, dtype=parse_dtype(dtype))
    written = save(adapter, out, "peft", force=force, provenance=provenance([base, tuned]))
    result = {"output": str(written), **report.to_dict()}
    if as_json:
        click.echo(dumps(result))
    elif not quiet:
        ranks = sorted({m["rank"] for m in report.modules})
        click.echo(f"extracted {len(report.modules)} modules (ranks {ranks}) -> {written}; "
                   f"{len(report.skipped)} tensors skipped, {len(report.saved)} saved")


@cli.command("squeeze")
@click.argument("sources", nargs=-1, required=True)
@click.option("-o", "--output", "out", required=True,
              help="Output path (a folder when several sources are given).")
@click.option("--to", "to", type=click.Choice(["peft", "diffusers", "kohya"]), default=None,
              help="Output format (default: the input's).")
@click.option("--method", type=click.Choice(["auto", "exact", "randomized"]), default="auto",
              show_default=True, help="exact: SVD from the factors; randomized: the paper's "
              "randomized SVD of the reconstructed update; auto: exact.")
@click.option("--oversample", type=int, default=10, show_default=True,
              help="Randomized SVD oversampling.")
@click.option("--n-iter", type=int, default=2, show_default=True,
              help="Randomized SVD power iterations.")
@click.option("--seed", type=int, default=0, show_default=True, help="Randomized SVD seed.")
@rank_policy_options
@device_option
@click.option("--report", "report_file", default=None, help="Write the per-module report (JSON).")
@common_write_options
def squeeze_cmd(sources: tuple[str, ...], out: str, to: str | None, method: str,
                oversample: int, n_iter: int, seed: int, device: str, report_file: str | None,
                force: bool, dtype: str | None, quiet: bool, as_json: bool,
                **policy_kw: Any) -> None:
    """LoRA-Squeeze: compress trained adapters to a lower rank (post-hoc)."""
    from pathlib import Path

    from lorakit.api import load, save
    from lorakit.compress.squeeze import SqueezeOptions, squeeze_with
    from lorakit.report import dumps, print_resize

    policy = policy_from(policy_kw)
    options = SqueezeOptions(method=method, oversample=oversample, n_iter=n_iter, seed=seed,
                             device=device)
    many = len(sources) > 1
    results = []
    for src in sources:
        adapter = load(src)
        target = Path(out) / Path(src).name if many else Path(out)
        progress = None if quiet or as_json or not sys.stderr.isatty() else _progress_cb()
        small, report = squeeze_with(adapter, policy, options, progress=progress)
        written = save(small, target, to, force=force, dtype=parse_dtype(dtype),
                       provenance=provenance([src]))
        info = {"source": src, "output": str(written), **report.to_dict()}
        results.append(info)
        if not (quiet or as_json):
            print_resize(info, _console())
    if report_file:
        Path(report_file).write_text(dumps(results if many else results[0]))
    if as_json:
        click.echo(dumps(results if many else results[0]))


def _progress_cb():
    def cb(key: str) -> None:
        click.echo(f"\r  {key[:70]:<70}", nl=False, err=True)

    return cb


def main(argv: list[str] | None = None) -> None:
    """Console entry point with the one-line error contract."""
    from lorakit.io import guard_inputs

    try:
        with guard_inputs():  # an output may never replace a file the command read
            cli.main(args=argv, prog_name="lorakit", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("lorakit: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except LorakitError as e:
        if os.environ.get("LORAKIT_DEBUG") == "1":
            raise
        click.echo(f"lorakit: error: {e}", err=True)
        sys.exit(1)
    except OSError as e:
        if os.environ.get("LORAKIT_DEBUG") == "1":
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        click.echo(f"lorakit: error: {where}{e.strerror or e}", err=True)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
