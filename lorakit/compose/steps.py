"""Run a validated recipe (:mod:`lorakit.compose.recipe`) through the Python API.

Each step calls the same function the matching CLI command calls, with the same arguments
(``lorakit.api.load``, ``lorakit.merge.merge``, ``lorakit.compress.resize.resize``,
``squeeze_with``, ``extract``, ``lorakit.api.convert`` and ``lorakit.formats.save_adapter``, the
writer behind ``lorakit.api.save``), so a recipe writes the same weights as those commands run one
by one (see "Equivalence" below).

Outputs are all-or-nothing: every ``save`` step writes into a staging folder beside its output,
and the outputs are moved into place only after every step has succeeded; a failure anywhere
leaves no output (and no staging folder) behind. ``push`` steps run last, after the outputs are in
place, through ``lorakit.hub.push`` (imported when a push runs), which completes the pushed model
card from the save step's provenance (recipe and sources).

What a saved output records: the provenance every lorakit write carries, with ``command``
(``lorakit run RECIPE``), ``sources`` (the recipe inputs this output derives from, as written),
``recipe`` (the recipe text, verbatim) and ``recipe_step`` (the save step's name). PEFT folders
show it in ``README.md`` (the model card, with the recipe in a ``## Recipe`` YAML block);
diffusers and kohya files in their ``lorakit.provenance`` metadata entry.

Equivalence with the CLI: for a chain ``load/merge/resize/squeeze/extract -> [convert] -> save``,
a PEFT output's ``adapter_model.safetensors`` and ``adapter_config.json`` are byte-identical to
those the commands write one by one, and only ``README.md`` differs (it records the recipe
instead of the last command). A diffusers or kohya file is byte-identical in its tensor data and
in every header entry except ``lorakit.provenance`` (the same record, in the file itself). This
holds because an adapter written and read back by lorakit is the adapter it wrote (same factors,
dtype, config, module order), which ``tests/compose/test_recipe_cli.py`` checks on real adapters.
A ``convert`` in the middle of a chain (followed by more steps) keeps the tensors equal, but the
CLI would re-read the converted file and carry its metadata forward, which a recipe does not.

Example:
    >>> from lorakit.compose import run_recipe
    >>> result = run_recipe("trio.yaml", force=True)   # doctest: +SKIP
    >>> result.outputs                                 # doctest: +SKIP
    {'out': PosixPath('out/trio.safetensors')}
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.adapter import Adapter
from lorakit.compose.recipe import Recipe, Step, StepKind, is_hub, load_recipe, parse_recipe
from lorakit.errors import LorakitError, OutputWriteError
from lorakit.io import make_parents, remove_dirs, repoint_error


@dataclass
class Value:
    """What a step's name stands for: an adapter (with the format a save defaults to and the
    recipe inputs it derives from), or a written output."""

    step: Step
    adapter: Adapter | None = None
    fmt: str | None = None  # set by convert (its target) and extract (peft)
    sources: tuple[str, ...] = ()
    path: Path | None = None  # save: the output written


@dataclass
class RecipeResult:
    """What a run did: outputs per save step, push results, and a summary per step."""

    outputs: dict[str, Path] = field(default_factory=dict)
    pushed: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"outputs": {k: str(v) for k, v in self.outputs.items()},
                "pushed": {k: _jsonable(v) for k, v in self.pushed.items()},
                "steps": self.steps}


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if hasattr(v, "to_dict"):  # e.g. the Hub's PushResult
        return _jsonable(v.to_dict())
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)


def provenance(recipe: Recipe, step: Step, sources: tuple[str, ...],
               command: str | None = None) -> dict[str, Any]:
    """The record a recipe's save step writes into its output.

    Example:
        >>> from lorakit.compose.recipe import parse_recipe
        >>> r = parse_recipe("steps:\\n  - load: a\\n    source: hf://o/r\\n"
        ...                  "  - save: s\\n    input: a\\n    output: /tmp/nowhere-x\\n")
        >>> sorted(provenance(r, r.step("s"), ("hf://o/r",)))
        ['command', 'recipe', 'recipe_step', 'sources', 'tool']
    """
    from lorakit import __version__

    where = str(recipe.path) if recipe.path is not None else "RECIPE.yaml"
    return {"tool": f"lorakit {__version__}", "command": command or f"lorakit run {where}",
            "sources": list(sources), "recipe": recipe.text, "recipe_step": step.name}


# ------------------------------------------------------------------------------- staging


@dataclass
class _Staged:
    step: Step
    out: Path  # the final output path
    temp: Any  # the locked staging folder (lorakit.outputs.Temp) beside or inside it
    written: Path  # what save_adapter wrote, inside the staging folder
    force: bool
    created: list[Path]  # parent folders this run created (deepest first)

    @property
    def stage(self) -> Path:
        return self.temp.path

    @property
    def final(self) -> Path:
        rel = self.written.relative_to(self.stage / self.out.name)
        return self.out / rel if str(rel) != "." else self.out


class _Outputs:
    """Save steps write here; :meth:`commit` moves everything into place at the end, under the
    output rules of :mod:`lorakit.outputs` (all checked before the first is put in place)."""

    def __init__(self) -> None:
        self.items: list[_Staged] = []

    def write(self, step: Step, adapter: Adapter, fmt: str | None, dtype: Any,
              prov: dict[str, Any], force: bool) -> _Staged:
        from lorakit.formats import save_adapter
        from lorakit.outputs import check_output, new_temp, remove_stale

        out = step.path
        assert out is not None
        check_output(out, force)
        created: list[Path] = []
        try:
            created = make_parents(out.parent)
            remove_stale(out)
            temp = new_temp(out, is_dir=True)
        except OSError as e:
            remove_dirs(created)
            raise OutputWriteError(f"cannot create the output ({e.strerror or e})",
                                   path=out) from e
        item = _Staged(step, out, temp, temp.path / out.name, force, created)
        self.items.append(item)
        try:
            # what lorakit.api.save does, minus noting the (staging) path as written: the final
            # paths are noted once they are in place (see _note_written)
            item.written = save_adapter(adapter, temp.path / out.name, fmt, dtype=dtype,
                                        provenance=prov)
        except LorakitError as e:
            repoint_error(e, temp.path / out.name, out)
            raise
        return item

    def commit(self) -> dict[str, Path]:
        from lorakit.outputs import check_output, install, plan_install

        plans = []
        for item in self.items:  # every output checked before the first is put in place
            new = item.stage / item.out.name
            check_output(item.out, item.force, is_dir=new.is_dir())
            plans.append(plan_install(new, item.out)
                         if new.is_dir() and item.out.is_dir() else None)
        done: dict[str, Path] = {}
        for item, plan in zip(self.items, plans, strict=True):
            new = item.stage / item.out.name
            install(new, item.out, force=item.force, is_dir=new.is_dir(), plan=plan)
            item.temp.discard()
            done[item.step.name] = item.final
        self.items = []
        return done

    def abort(self) -> None:
        for item in reversed(self.items):
            item.temp.discard()
            remove_dirs(item.created)
        self.items = []


# --------------------------------------------------------------------------------- steps


def _torch_dtype(name: str | None):
    import torch

    return getattr(torch, name) if name else None


def _device(step: Step, default: str | None) -> str:
    return step.args.get("device") or default or "auto"


def _adapter_step(step: Step, values: dict[str, Value], device: str | None) -> Value:
    """Run one step that produces an adapter."""
    a = step.args
    kind = step.kind
    if kind in (StepKind.LOAD, StepKind.PULL):
        from lorakit.api import load

        src = a["source"]
        if kind is StepKind.PULL:
            from lorakit.hub import resolve

            target: str | Path = resolve(src)
        else:
            target = src if is_hub(src) else step.path
        return Value(step, load(target, a.get("format")), sources=(src,))
    if kind is StepKind.EXTRACT:
        from lorakit.compress.extract import extract

        adapter, _ = extract(step.paths["base"], step.paths["tuned"], step.policy,
                             max_rank=a.get("max_rank", 256), non_lora=a.get("non_lora", "skip"),
                             seed=a.get("seed", 0), device=_device(step, device),
                             dtype=_torch_dtype(a.get("dtype")))
        return Value(step, adapter, "peft", (a["base"], a["tuned"]))
    ins = [values[n] for n in step.inputs]
    if kind is StepKind.COMPOSE:
        return _compose(step, ins)
    sources = tuple(dict.fromkeys(s for v in ins for s in v.sources))
    first = ins[0]
    if kind is StepKind.MERGE:
        from lorakit.merge import merge

        merged = merge([v.adapter for v in ins], a["method"], a.get("weights"),
                       options=step.options, policy=step.policy,
                       intersect=a.get("intersect", False), extras=a.get("extras", "error"),
                       device=_device(step, device), seed=a.get("seed", 0),
                       **{k: a[k] for k in ("model", "calibration", "grams") if k in a})
        return Value(step, merged, first.fmt, sources)
    if kind is StepKind.RESIZE:
        from lorakit.compress.resize import resize

        small, _ = resize(first.adapter, step.policy, device=_device(step, device))
        return Value(step, small, first.fmt, sources)
    if kind is StepKind.SQUEEZE:
        from lorakit.compress.squeeze import SqueezeOptions, squeeze_with

        opts = SqueezeOptions(method=a.get("method", "auto"), oversample=a.get("oversample", 10),
                              n_iter=a.get("n_iter", 2), seed=a.get("seed", 0),
                              device=_device(step, device))
        small, _ = squeeze_with(first.adapter, step.policy, opts)
        return Value(step, small, first.fmt, sources)
    if kind is StepKind.CONVERT:
        from lorakit.api import convert

        out = convert(first.adapter, a["to"], component=a.get("component"))
        return Value(step, out, a["to"], sources)
    raise AssertionError(kind)  # pragma: no cover


def _compose(step: Step, ins: list[Value]) -> Value:
    """Split each entry's input into units, select, concatenate and assemble them."""
    from lorakit.compose.units import assemble, combine, select, split

    sets = []
    for i, (entry, value) in enumerate(zip(step.args["units"], ins, strict=True)):
        units = split(value.adapter, float(entry.get("weight", 1.0)), source=i)
        criteria = {k: entry[k] for k in ("top", "energy", "min_norm", "min_share",
                                          "module_regex") if k in entry}
        sets.append(select(units, **criteria) if criteria else units)
    first = ins[0]
    out = assemble(combine(*sets), like=first.adapter)
    sources = tuple(dict.fromkeys(s for v in ins for s in v.sources))
    return Value(step, out, first.fmt, sources)


def _summary(step: Step, value: Value) -> dict[str, Any]:
    info: dict[str, Any] = {"step": step.name, "kind": step.kind.value}
    if value.adapter is not None and step.kind is not StepKind.SAVE:
        info["modules"] = len(value.adapter.modules)
        info["ranks"] = sorted(set(value.adapter.ranks().values()))
    return info


def _note_written(outputs: dict[str, Path], provs: dict[str, dict[str, Any]]) -> None:
    """Tell the Hub module what was written (as ``lorakit.api.save`` does for every write)."""
    try:
        from lorakit.hub import note_written
    except ImportError:  # an installation without the Hub module
        return
    for name, path in outputs.items():
        note_written(path, provs[name])


def run_recipe(recipe: Recipe | str | Path, *, force: bool = False, device: str | None = None,
               command: str | None = None, progress: Callable[[Step], None] | None = None
               ) -> RecipeResult:
    """Validate then run a recipe (a :class:`Recipe` or a recipe file).

    Nothing runs when validation finds problems (:class:`~lorakit.errors.RecipeError` lists them
    all). ``force`` lets save steps overwrite existing outputs; ``device`` is the default for
    steps that do not set one; ``command`` is recorded as the producing command (default
    ``lorakit run RECIPE``); ``progress(step)`` is called before each step.

    Example:
        >>> result = run_recipe("trio.yaml")        # doctest: +SKIP
        >>> result.to_dict()["outputs"]             # doctest: +SKIP
        {'out': 'out/trio.safetensors'}
    """
    from lorakit.io import guard_inputs

    if isinstance(recipe, Recipe):
        recipe = parse_recipe(recipe.text, base_dir=recipe.base_dir, path=recipe.path,
                              force=force)
    else:
        recipe = load_recipe(recipe, force=force)
    with guard_inputs():
        return _run(recipe, force, device, command, progress)


def _run(recipe: Recipe, force: bool, device: str | None, command: str | None,
         progress: Callable[[Step], None] | None) -> RecipeResult:
    values: dict[str, Value] = {}
    result = RecipeResult()
    outputs = _Outputs()
    staged: dict[str, _Staged] = {}
    provs: dict[str, dict[str, Any]] = {}
    pushes: list[Step] = []
    try:
        for step in recipe.steps:
            if step.kind is StepKind.PUSH:
                pushes.append(step)
                continue
            if progress is not None:
                progress(step)
            if step.kind is StepKind.SAVE:
                src = values[step.args["input"]]
                fmt = step.args.get("format") or src.fmt
                prov = provenance(recipe, step, src.sources, command)
                item = outputs.write(step, src.adapter, fmt, _torch_dtype(step.args.get("dtype")),
                                     prov, force or step.args.get("force", False))
                staged[step.name] = item
                provs[step.name] = prov
                values[step.name] = Value(step, src.adapter, fmt, src.sources)
                result.steps.append({"step": step.name, "kind": "save",
                                     "output": str(item.final)})
                continue
            value = _adapter_step(step, values, device)
            values[step.name] = value
            result.steps.append(_summary(step, value))
        result.outputs = outputs.commit()
    except BaseException:
        outputs.abort()
        raise
    _note_written(result.outputs, provs)
    for step in pushes:
        from lorakit.hub import push

        if progress is not None:
            progress(step)
        src = step.args["input"]
        a = step.args
        # the output as named in the recipe (a PEFT folder, a file, or a folder holding one);
        # the Hub module completes its card from this provenance (recipe and sources)
        result.pushed[step.name] = push(staged[src].out, a["repo"],
                                        revision=a.get("revision"),
                                        private=a.get("private", False),
                                        dry_run=a.get("dry_run", False), card=provs[src])
        result.steps.append({"step": step.name, "kind": "push", "repo": a["repo"]})
    return result


__all__ = ["run_recipe", "RecipeResult", "Value", "provenance"]
