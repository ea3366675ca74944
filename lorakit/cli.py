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


def main(argv: list[str] | None = None) -> None:
    """Console entry point with the one-line error contract."""
    try:
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
