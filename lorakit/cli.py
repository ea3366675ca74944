"""The ``lorakit`` command line: a thin click layer over the Python API.

Every command maps a :class:`~lorakit.errors.LorakitError` to one line on stderr and exit code 1
(``LORAKIT_DEBUG=1`` shows the traceback); usage errors exit 2.

Example:
    $ lorakit inspect ../shared/real_adapters/gpt2_r4_jhess --json
    $ lorakit convert adapter_dir --to kohya -o lora.safetensors
"""

from __future__ import annotations

import contextlib
import gc
import os
import shlex
import sys
from typing import TYPE_CHECKING, Any

import click

from lorakit.errors import LorakitError

if TYPE_CHECKING:
    from rich.console import Console

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _console(quiet: bool = False) -> Console:
    from rich.console import Console  # imported on use: it costs ~0.1 s of every command's start

    return Console(quiet=quiet, soft_wrap=False, width=None if sys.stdout.isatty() else 160)


_ARGV: list[str] | None = None  # the arguments main() was called with (else sys.argv)


def provenance(sources: list[str]) -> dict[str, Any]:
    """What produced an output: the command line and its sources (recorded in every write)."""
    from lorakit import __version__

    argv = ["lorakit", *(_ARGV if _ARGV is not None else sys.argv[1:])]
    return {"tool": f"lorakit {__version__}", "command": printable(shlex.join(argv)),
            "sources": [printable(s) for s in sources]}


def printable(text: str) -> str:
    """``text`` as valid UTF-8: bytes of a non-UTF-8 file name (which Python carries as lone
    surrogates) become U+FFFD, so cards and metadata can record it."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def parse_dtype(name: str | None):
    import torch

    if name is None:
        return None
    key = DTYPES.get(name.lower())
    if key is None:
        raise click.BadParameter(f"unknown dtype {name!r} (use float32, float16 or bfloat16)")
    return getattr(torch, key)


def _store_push_option(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    ctx.meta.setdefault("lorakit.push", {})[param.name] = value
    return value


def push_options(f):
    """``--push-to ORG/REPO`` (+ ``--private``, ``--revision``, ``--dry-run``): after the command
    wrote its output, upload it with a model card (see :func:`lorakit.hub.push`). The values go to
    ``ctx.meta``, so commands need no extra parameters; the group's result callback pushes."""
    import functools

    command = f

    @functools.wraps(command)
    def checked(*args: Any, **kwargs: Any) -> Any:
        opts = click.get_current_context().meta.get("lorakit.push") or {}
        given = [f"--{k.replace('_', '-')}" for k in ("private", "revision", "dry_run")
                 if opts.get(k)]
        if given and not opts.get("push_to"):  # refused before anything is written
            raise click.UsageError(f"{', '.join(given)} only apply with --push-to ORG/REPO")
        return command(*args, **kwargs)

    f = checked
    opts = [
        click.option("--push-to", metavar="ORG/REPO", default=None, expose_value=False,
                     callback=_store_push_option, help="Upload the output to this Hub repo."),
        click.option("--private", is_flag=True, expose_value=False, callback=_store_push_option,
                     help="With --push-to: create the repo as private."),
        click.option("--revision", default=None, expose_value=False,
                     callback=_store_push_option, help="With --push-to: branch to push to."),
        click.option("--dry-run", is_flag=True, expose_value=False, callback=_store_push_option,
                     help="With --push-to: list what would be uploaded, upload nothing."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def batch_options(f):
    """Options of commands that run one job per source over a collection (lorakit.batch)."""
    opts = [
        click.option("--jobs", type=click.IntRange(min=1), default=None,
                     help="Parallel jobs over a collection (local processes; Ray CPUs)."),
        click.option("--executor", type=click.Choice(["local", "ray"]), default="local",
                     show_default=True, help="Run jobs in a local process pool or on Ray."),
        click.option("--address", default=None, help="Ray cluster address (with --executor "
                     "ray; default: start a local Ray runtime)."),
        click.option("--chunk", type=click.IntRange(min=1), default=None,
                     help="With --executor ray: sources per Ray task (default: up to 64, at "
                     "least 4 tasks per CPU)."),
        click.option("--keep-going", is_flag=True,
                     help="Run every job even after a failure; the summary lists each one."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def run_batch_cli(task: str, plan: Any, out: str, options: dict[str, Any],
                  batch_kw: dict[str, Any], *, force: bool, quiet: bool, as_json: bool,
                  report_file: str | None) -> None:
    """Run a command over a collection: one output per source under ``out`` (lorakit.batch)."""
    from lorakit.batch import BatchOptions, Executor, run_command
    from lorakit.hub import note_written

    batch = BatchOptions(jobs=batch_kw.get("jobs"), executor=Executor(batch_kw["executor"]),
                         address=batch_kw.get("address"), keep_going=batch_kw["keep_going"],
                         force=force, chunk=batch_kw.get("chunk"))
    run_command(task, plan, out, options, batch=batch, report=report_file, quiet=quiet,
                as_json=as_json, provenance=provenance([]))
    note_written(out)  # --push-to uploads the whole collection folder


def check_single_report(report_file: str | None, force: bool, out: str, plan: Any) -> None:
    """Refuse a bad ``--report FILE`` of a one-adapter command before any work (the output
    rules: not an input, not existing without --force, not a folder, its folder present, apart
    from -o)."""
    if report_file:
        from pathlib import Path

        from lorakit.batch import batch_inputs
        from lorakit.outputs import check_report

        check_report(report_file, force, outputs=[Path(out)], inputs=batch_inputs(plan))


def _batch_kw(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {n: kwargs.pop(n) for n in ("jobs", "executor", "address", "chunk", "keep_going")}


def _dtype_name(name: str | None) -> str | None:
    if name is None:
        return None
    parse_dtype(name)  # validates
    return DTYPES[name.lower()]


def common_write_options(f):
    f = push_options(f)
    f = click.option("--force", is_flag=True, help="Overwrite an existing output.")(f)
    f = click.option("--dtype", default=None, help="Output dtype (float32|float16|bfloat16); "
                     "default: the input's.")(f)
    f = click.option("--quiet", is_flag=True, help="No progress or tables.")(f)
    f = click.option("--json", "as_json", is_flag=True, help="Machine-readable result.")(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lorakit")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """lorakit: inspect, convert, merge, compose, resize, extract and transfer LoRA adapters."""
    from lorakit.hub import record_writes

    ctx.meta["lorakit.written"] = ctx.with_resource(record_writes())


@cli.result_callback()
@click.pass_context
def _push_written(ctx: click.Context, result: Any, **_: Any) -> Any:
    """After a writing command succeeded: upload its output for ``--push-to``."""
    opts = ctx.meta.get("lorakit.push") or {}
    if not opts.get("push_to"):
        return result
    from lorakit.hub import push

    written = list(dict.fromkeys(p for p, _ in ctx.meta.get("lorakit.written") or []))
    if len(written) != 1:
        raise click.UsageError(f"--push-to needs exactly one written output, got {len(written)}")
    prov = next(pr for p, pr in ctx.meta["lorakit.written"] if p == written[0])
    res = push(written[0], opts["push_to"], revision=opts.get("revision"),
               private=bool(opts.get("private")), dry_run=bool(opts.get("dry_run")),
               card=prov if isinstance(prov, dict) else None, command=provenance([])["command"])
    _echo_push(res, err=True)
    return result


def _echo_push(res: Any, err: bool = False) -> None:
    where = res.repo_id + (f"@{res.revision}" if res.revision else "")
    if res.dry_run:
        vis = " (private)" if res.private else ""
        click.echo(f"dry run: would upload {len(res.files)} files ({res.total_bytes:,} bytes) "
                   f"to {where}{vis}:", err=err)
        for path, n in res.files:
            click.echo(f"  {path}  {n:,} bytes", err=err)
    else:
        click.echo(f"pushed {len(res.files)} files ({res.total_bytes:,} bytes) to {where}"
                   + (f": {res.commit_url}" if res.commit_url else ""), err=err)


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

    vals = policy_values(kwargs)
    if not default_required and all(v is None for k, v in vals.items() if k != "conv_rank"):
        return None
    return RankPolicy.from_options(**vals)


def policy_values(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The rank-policy options (popped from kwargs) as JSON-ready values (budget parsed)."""
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
    return vals


LAYOUT_CHOICES = ("peft", "diffusers", "kohya", "bfl", "comfyui", "xlabs", "aitoolkit",
                  "simpletuner", "falkontext", "fal-kontext", "bflcontrol", "bfl-control",
                  "peftnative", "peft-native")


def family_options(f):
    """``--family`` and ``--ignore-unknown``, shared by the commands that read adapters."""
    from lorakit.formats.families import FAMILIES

    f = click.option("--ignore-unknown", is_flag=True,
                     help="Read past keys that fit no layout role or name no module of the "
                          "family, and list them.")(f)
    return click.option("--family", type=click.Choice(list(FAMILIES)), default=None,
                        help="Model family (default: detected from the module names).")(f)


def _echo_ignored(adapter: Any, err: bool = True) -> None:
    from lorakit.formats.coverage import ignored

    keys = ignored(adapter)
    if keys:
        click.echo(f"ignored {len(keys)} unknown key(s): " + ", ".join(keys), err=err)


@cli.command("inspect")
@click.argument("paths", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--no-spectra", is_flag=True, help="Skip singular values (faster).")
@click.option("--max-rows", default=60, show_default=True, help="Module rows per table.")
@family_options
def inspect_cmd(paths: tuple[str, ...], as_json: bool, no_spectra: bool, max_rows: int,
                family: str | None, ignore_unknown: bool) -> None:
    """Show format, family, coverage, modules, ranks, alphas, scales and exact spectra."""
    from lorakit.api import load
    from lorakit.inspect import inspect_adapter
    from lorakit.report import dumps, print_inspect
    from lorakit.sources import expand

    specs = [s.spec for s in expand(paths).sources]  # globs, collections, manifests, hf://
    infos = []
    for p in specs:
        adapter = load(p, family=family, ignore_unknown=ignore_unknown)
        if not as_json:
            _echo_ignored(adapter)
        infos.append(inspect_adapter(adapter, spectra=not no_spectra, family=family))
    if as_json:
        click.echo(dumps(infos if len(infos) > 1 else infos[0]))
        return
    console = _console()
    for info in infos:
        print_inspect(info, console, max_rows=max_rows)


@cli.command("convert")
@click.argument("sources", nargs=-1, required=True)
@click.option("--to", "to", required=True, type=click.Choice(list(LAYOUT_CHOICES)),
              help="Target layout (peft, diffusers, kohya, bfl/comfyui, xlabs, aitoolkit, "
                   "simpletuner, falkontext, bflcontrol, peftnative).")
@click.option("-o", "--output", "out", required=True,
              help="Output folder (PEFT) or file; a folder for a collection.")
@click.option("--component", default=None,
              help="Diffusion component to keep or assume (unet, text_encoder, transformer...).")
@family_options
@batch_options
@click.option("--report", "report_file", default=None,
              help="Write the result (a collection: each job's status, time, error; .json/.csv).")
@common_write_options
@rank_policy_options
def convert_cmd(sources: tuple[str, ...], to: str, out: str, component: str | None,
                family: str | None, ignore_unknown: bool,
                report_file: str | None, force: bool, dtype: str | None, quiet: bool,
                as_json: bool, **batch_kw: Any) -> None:
    """Convert adapters between layouts (updates unchanged: fused <-> split exactly). A rank
    policy (--rank, --energy, ...) then shrinks the result through the engine (e.g. a
    block-diagonal fused qkv)."""
    from lorakit.api import convert, load, save
    from lorakit.outputs import write_text_output
    from lorakit.report import dumps
    from lorakit.sources import expand

    policy = policy_from(batch_kw, default_required=False)
    plan = expand(sources)
    if plan.is_collection:
        if family or ignore_unknown or policy is not None:
            raise click.UsageError("--family, --ignore-unknown and rank policies take one source")
        return run_batch_cli("convert", plan, out,
                             {"to": to, "component": component, "dtype": _dtype_name(dtype)},
                             _batch_kw(batch_kw), force=force, quiet=quiet, as_json=as_json,
                             report_file=report_file)
    check_single_report(report_file, force, out, plan)
    src = plan.sources[0].spec
    adapter = load(src, family=family, ignore_unknown=ignore_unknown)
    if not quiet and not as_json:
        _echo_ignored(adapter)
    converted = convert(adapter, to, component=component, family=family)
    converted = _drop_unheld_extras(converted, to, ignore_unknown, quiet or as_json)
    if policy is not None:
        from lorakit.compress.resize import resize

        converted, _ = resize(converted, policy)
    written = save(converted, out, to, force=force, dtype=parse_dtype(dtype),
                   provenance=provenance([src]), family=family)
    result = {"source": src, "output": str(written), "format": to,
              "modules": len(converted.modules)}
    if report_file:
        write_text_output(report_file, dumps(result), force=force)
    if as_json:
        click.echo(dumps(result))
    elif not quiet:
        click.echo(f"wrote {written} ({to}, {len(converted.modules)} modules)")


def _drop_unheld_extras(adapter: Any, to: str, ignore_unknown: bool, quiet: bool) -> Any:
    """With ``--ignore-unknown``, extra tensors the target layout cannot hold (a control LoRA's
    norm scales for kohya/bfl) are dropped and listed; without it the writer names them."""
    from lorakit.formats.registry import EXTRAS_LAYOUTS, parse_format

    if not ignore_unknown or not adapter.extras or parse_format(to).value in EXTRAS_LAYOUTS:
        return adapter
    if not quiet:
        click.echo(f"dropped {len(adapter.extras)} extra tensor(s) the {to} layout cannot hold: "
                   + ", ".join(sorted(adapter.extras)), err=True)
    return adapter.copy(extras={})


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
@batch_options
@click.option("--report", "report_file", default=None, help="Write the per-module report "
              "(JSON); for a collection, each job's status, time and error (.json or .csv).")
@common_write_options
def resize_cmd(sources: tuple[str, ...], out: str, to: str | None, device: str,
               report_file: str | None, force: bool, dtype: str | None, quiet: bool,
               as_json: bool, **policy_kw: Any) -> None:
    """Resize adapters to a smaller rank by the exact SVD of each update (from the factors)."""
    from pathlib import Path

    from lorakit.api import load, save
    from lorakit.compress.resize import resize
    from lorakit.lowrank import RankPolicy
    from lorakit.outputs import write_text_output
    from lorakit.report import dumps, print_resize
    from lorakit.sources import expand

    batch_kw = _batch_kw(policy_kw)
    values = policy_values(policy_kw)
    policy = RankPolicy.from_options(**values)
    plan = expand(sources)
    if plan.is_collection:
        return run_batch_cli("resize", plan, out, {"policy": values, "to": to, "device": device,
                                                   "dtype": _dtype_name(dtype)},
                             batch_kw, force=force, quiet=quiet, as_json=as_json,
                             report_file=report_file)
    check_single_report(report_file, force, out, plan)
    many = False
    results = []
    for src in (s.spec for s in plan.sources):
        adapter = load(src)
        target = Path(out)
        progress = None if quiet or as_json or not sys.stderr.isatty() else _progress_cb()
        resized, report = resize(adapter, policy, device=device, progress=progress)
        written = save(resized, target, to, force=force, dtype=parse_dtype(dtype),
                       provenance=provenance([src]))
        info = {"source": src, "output": str(written), **report.to_dict()}
        results.append(info)
        if not (quiet or as_json):
            print_resize(info, _console())
    if report_file:
        write_text_output(report_file, dumps(results if many else results[0]), force=force)
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
@click.option("--space", type=click.Choice(["full", "knots", "core"]), default=None,
              help="Where entry-wise rules (ties, dare_*, magnitude_prune, breadcrumbs, della) "
              "act: full updates (default), KnOTS or Core Space coefficients.")
@click.option("--model", "model", default=None, metavar="DIR|FILE.gguf|ORG/NAME",
              help="Base model for calibrated methods (regmean).")
@click.option("--calibration", default=None, metavar="FILES|DIR",
              help="regmean: prompts per adapter, FILE,FILE,... aligned with the sources "
              "(.jsonl text fields or one prompt per line), or a folder with one file per "
              "adapter name.")
@click.option("--grams", default=None, metavar="DIR", help="regmean: cache the captured Gram "
              "matrices here (re-merging reads them and runs no model).")
@rank_policy_options
@device_option
@common_write_options
def merge_cmd(sources: tuple[str, ...], method: str, weights: str | None, out: str,
              to: str | None, intersect: bool, extras: str, method_options: tuple[str, ...],
              seed: int, space: str | None, model: str | None, calibration: str | None,
              grams: str | None, device: str, force: bool, dtype: str | None, quiet: bool,
              as_json: bool, **policy_kw: Any) -> None:
    """Merge adapters into one on the full update sum_i w_i * scale_i * B_i @ A_i.

    regmean also takes --model and --calibration (and --grams DIR to cache the Grams)."""
    from lorakit.api import load, save
    from lorakit.merge import merge
    from lorakit.report import dumps
    from lorakit.sources import expand

    sources = tuple(s.spec for s in expand(sources).sources)  # globs, collections, manifests
    if len(sources) < 2 and method not in ("linear", "task_arithmetic", "svd"):
        raise click.BadParameter("merge needs at least two sources")
    policy = policy_from(policy_kw, default_required=False)
    values = dict(_parse_option(o) for o in method_options)
    if space is not None:
        values["space"] = space
    calibrated = {"model": model, "calibration": calibration, "grams": grams}
    adapters = [load(s) for s in sources]
    progress = None if quiet or as_json or not sys.stderr.isatty() else _progress_cb()
    merged = merge(adapters, method, weights, policy=policy, intersect=intersect,
                   extras=extras, device=device, seed=seed, progress=progress,
                   **{k: v for k, v in calibrated.items() if v is not None}, **values)
    prov = provenance(list(sources))
    prov.update({"method": method, "weights": weights, "options": values,
                 **{k: v for k, v in calibrated.items() if v is not None}})
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
    from lorakit.outputs import note_input
    from lorakit.report import dumps

    note_input(base)  # the checkpoints are inputs: no output may be, hold or lie inside them
    note_input(tuned)
    check_output(Path(out), force, is_dir=True)
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
@batch_options
@click.option("--report", "report_file", default=None, help="Write the per-module report "
              "(JSON); for a collection, each job's status, time and error (.json or .csv).")
@common_write_options
def squeeze_cmd(sources: tuple[str, ...], out: str, to: str | None, method: str,
                oversample: int, n_iter: int, seed: int, device: str, report_file: str | None,
                force: bool, dtype: str | None, quiet: bool, as_json: bool,
                **policy_kw: Any) -> None:
    """LoRA-Squeeze: compress trained adapters to a lower rank (post-hoc)."""
    from pathlib import Path

    from lorakit.api import load, save
    from lorakit.compress.squeeze import SqueezeOptions, squeeze_with
    from lorakit.lowrank import RankPolicy
    from lorakit.outputs import write_text_output
    from lorakit.report import dumps, print_resize
    from lorakit.sources import expand

    batch_kw = _batch_kw(policy_kw)
    values = policy_values(policy_kw)
    policy = RankPolicy.from_options(**values)
    options = SqueezeOptions(method=method, oversample=oversample, n_iter=n_iter, seed=seed,
                             device=device)
    plan = expand(sources)
    if plan.is_collection:
        squeeze = {"method": method, "oversample": oversample, "n_iter": n_iter, "seed": seed,
                   "device": device}
        return run_batch_cli("squeeze", plan, out, {"policy": values, "squeeze": squeeze,
                                                    "to": to, "dtype": _dtype_name(dtype)},
                             batch_kw, force=force, quiet=quiet, as_json=as_json,
                             report_file=report_file)
    check_single_report(report_file, force, out, plan)
    many = False
    results = []
    for src in (s.spec for s in plan.sources):
        adapter = load(src)
        target = Path(out)
        progress = None if quiet or as_json or not sys.stderr.isatty() else _progress_cb()
        small, report = squeeze_with(adapter, policy, options, progress=progress)
        written = save(small, target, to, force=force, dtype=parse_dtype(dtype),
                       provenance=provenance([src]))
        info = {"source": src, "output": str(written), **report.to_dict()}
        results.append(info)
        if not (quiet or as_json):
            print_resize(info, _console(), action="squeeze")
    if report_file:
        write_text_output(report_file, dumps(results if many else results[0]), force=force)
    if as_json:
        click.echo(dumps(results if many else results[0]))


@cli.command("push")
@click.argument("folder")
@click.argument("repo_id", metavar="ORG/REPO")
@click.option("--revision", default=None, help="Branch to push to (created when missing).")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option("--dry-run", is_flag=True, help="List what would be uploaded; upload nothing.")
@click.option("--message", default=None, help="Commit message.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result.")
def push_cmd(folder: str, repo_id: str, revision: str | None, private: bool, dry_run: bool,
             message: str | None, as_json: bool) -> None:
    """Upload an adapter (folder or file) or a folder of adapters to the Hub with a model card.

    The token comes from HF_TOKEN or `hf auth login` and is never printed.
    """
    from lorakit.hub import push
    from lorakit.report import dumps

    res = push(folder, repo_id, revision=revision, private=private, dry_run=dry_run,
               commit_message=message, command=provenance([])["command"])
    if as_json:
        click.echo(dumps({**res.to_dict(), "card": res.card}))
    else:
        _echo_push(res)


def _progress_cb():
    def cb(key: str) -> None:
        click.echo(f"\r  {key[:70]:<70}", nl=False, err=True)

    return cb


from lorakit.transfer.cli import transfer_cmd  # noqa: E402  (imports no transformers)

cli.add_command(transfer_cmd)

from lorakit.compose.cli import run_cmd  # noqa: E402

cli.add_command(run_cmd)


def _interrupt_on_sigterm() -> Any:
    """SIGTERM (``kill``, a job scheduler's stop) unwinds like Ctrl-C in this process, so every
    temporary is removed as on any failure; a forked worker just exits (its staging folder is
    unlocked then, and the next run removes it). Only where the default handler is in place."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None
    pid = os.getpid()

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != pid:
            os._exit(128 + signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: list[str] | None = None) -> None:
    """Console entry point with the one-line error contract."""
    from lorakit.io import guard_inputs

    # What is imported by now (torch alone: ~170k objects) lives as long as the process: frozen,
    # the cyclic GC stops walking it at each full collection, which the header and config
    # parsing of a load sets off (0.13 s off loading the four adapters of bench/merge_llm.py).
    gc.freeze()

    global _ARGV
    _ARGV = list(argv) if argv is not None else None
    restore = _interrupt_on_sigterm()
    for stream in (sys.stdout, sys.stderr):  # a non-UTF-8 file name never fails a print
        with contextlib.suppress(Exception):  # not a TextIOWrapper (a test's capture)
            stream.reconfigure(errors="backslashreplace")
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
    except Exception as e:  # a bug: still one line (and the traceback with LORAKIT_DEBUG=1)
        if os.environ.get("LORAKIT_DEBUG") == "1":
            raise
        from lorakit.errors import one_line

        text = one_line(f"{type(e).__name__}: {e}")[:300]
        click.echo(f"lorakit: error: internal error ({text}); run with LORAKIT_DEBUG=1 for the "
                   "traceback and report it", err=True)
        sys.exit(1)
    finally:
        if restore is not None:
            restore()


if __name__ == "__main__":  # pragma: no cover
    main()
