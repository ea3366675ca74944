"""``lorakit run RECIPE.yaml``: validate a recipe as a whole, then run it.

Example:
    $ lorakit run trio.yaml             # every problem listed at once, or the outputs written
    $ lorakit run trio.yaml --check     # validate only, print the steps
    $ lorakit run trio.yaml --force --json
"""

from __future__ import annotations

import shlex
import sys

import click


@click.command("run")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--check", is_flag=True, help="Validate the recipe and list its steps; run nothing.")
@click.option("--force", is_flag=True, help="Let save steps overwrite existing outputs.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help="Default device for steps that do not set one (default: auto).")
@click.option("--quiet", is_flag=True, help="No progress or summary.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result.")
def run_cmd(recipe: str, check: bool, force: bool, device: str | None, quiet: bool,
            as_json: bool) -> None:
    """Run a YAML recipe of named steps (load, pull, merge, resize, squeeze, convert, extract,
    compose, save, push); relative paths in it are relative to its folder."""
    from lorakit.compose.recipe import load_recipe
    from lorakit.compose.steps import run_recipe
    from lorakit.report import dumps

    parsed = load_recipe(recipe, force=force)  # RecipeError lists every problem; nothing ran
    if check:
        steps = [{"step": s.name, "kind": s.kind.value, "inputs": s.inputs} for s in parsed.steps]
        if as_json:
            click.echo(dumps({"recipe": recipe, "valid": True, "steps": steps}))
        elif not quiet:
            click.echo(f"{recipe}: valid, {len(steps)} steps")
            for i, s in enumerate(steps, 1):
                src = f" <- {', '.join(s['inputs'])}" if s["inputs"] else ""
                click.echo(f"  {i}. {s['kind']} {s['step']}{src}")
        return
    total = len(parsed.steps)
    show = not (quiet or as_json) and sys.stderr.isatty()  # progress on a terminal only

    def progress(step) -> None:
        if show:
            click.echo(f"[{step.index}/{total}] {step.kind.value} {step.name}", err=True)

    # the command as given (from the parsed options, not sys.argv, so it is right under any
    # caller, e.g. click's test runner)
    argv = ["lorakit", "run", recipe, *(["--force"] if force else []),
            *(["--device", device] if device else [])]
    command = shlex.join(argv)
    result = run_recipe(parsed, force=force, device=device, command=command, progress=progress)
    if as_json:
        click.echo(dumps({"recipe": recipe, **result.to_dict()}))
    elif not quiet:
        for name, path in result.outputs.items():
            click.echo(f"wrote {path} (step {name})")
        for name, pushed in result.pushed.items():
            repo = getattr(pushed, "repo_id", "")
            files = getattr(pushed, "files", None)
            what = f" ({len(files)} files)" if files is not None else ""
            verb = "would push" if getattr(pushed, "dry_run", False) else "pushed"
            target = f" to {repo}" if repo else ""
            click.echo(f"{verb} step {name}{target}{what}")
