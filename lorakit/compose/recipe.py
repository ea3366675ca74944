"""Recipes: multi-step YAML jobs whose named outputs feed later steps (``lorakit run``).

A recipe is a list of steps. Each step is a mapping whose *first* key is the step kind and whose
value is the step's name; the other keys are its fields. Outputs are referred to by name
(``input:`` / ``inputs:``) and only earlier steps can be referred to::

    # trio.yaml: relative paths are relative to this file's folder
    name: distilbert-trio
    steps:
      - load: emotion
        source: ../shared/real_adapters/distilbert_emotion_dayanidhi
      - load: imdb
        source: ../shared/real_adapters/distilbert_imdb_tashu
      - pull: notask                       # or load: with source: hf://org/repo[@rev][/sub]
        source: hf://vinil/distilbert-lora
      - merge: trio
        inputs: [emotion, imdb, notask]
        method: ties
        weights: [1, 1, 0.5]
        options: {density: 0.5}
        extras: first
      - resize: small
        input: trio
        energy: 0.9                        # any RANK-POLICY option: rank, sv_fro, budget ...
      - convert: as_diffusers
        input: small
        to: diffusers
      - save: out
        input: as_diffusers
        output: out/trio.safetensors
      - push: hub
        input: out                         # a save step whose output is a folder
        repo: me/distilbert-trio
        dry_run: true

Step kinds and their fields (``*`` required; the names and values are the CLI's):

========  ==================================================================================
load      source*, format
pull      source* (``hf://...``), format
merge     inputs*, method*, weights, options, intersect, extras, seed, device, RANK-POLICY,
          model, calibration, grams (regmean; local paths relative to the recipe)
resize    input*, RANK-POLICY*, device
squeeze   input*, RANK-POLICY*, method, oversample, n_iter, seed, device
convert   input*, to*, component
extract   base*, tuned*, RANK-POLICY*, max_rank, non_lora, seed, device, dtype
compose   units*: a list of {input*, weight, top, energy, min_norm, min_share, module_regex}
save      input*, output*, format, dtype, force
push      input* (a save step), repo*, revision, private, dry_run
========  ==================================================================================

RANK-POLICY is one of ``rank``, ``energy``, ``sv_ratio``, ``sv_fro``, ``sv_cumulative``,
``threshold``, ``budget`` (plus ``conv_rank``), exactly as :meth:`RankPolicy.from_options`.

``compose`` builds an adapter from rank-one units (:mod:`lorakit.compose.units`): each entry
splits one input (``weight`` folded in, default 1), keeps the units its criteria select, and the
entries' units are concatenated and assembled (extras and config from the first entry's input)::

      - compose: mix                       # the 4 strongest units of each module of a,
        units:                             # plus all of b's units in the attention layers
          - {input: a, top: 4}
          - {input: b, module_regex: '\\.attn\\.'}

:func:`load_recipe` (or :func:`parse_recipe`) validates the *whole* recipe before anything runs:
YAML syntax and duplicate keys, unknown step kinds and fields, field types and values, duplicate
names, references to undefined or later steps (or of the wrong kind), missing input files,
rank-policy options, merge methods and their options, weights counts, outputs that exist
(without ``force``) or are written twice, and it raises one :class:`~lorakit.errors.RecipeError`
listing every problem with its step and field. :func:`lorakit.compose.steps.run_recipe` runs it.

Example:
    >>> from lorakit.compose import load_recipe, run_recipe
    >>> recipe = load_recipe("trio.yaml")            # doctest: +SKIP
    >>> result = run_recipe(recipe)                  # doctest: +SKIP
    >>> result.outputs                               # doctest: +SKIP
    {'out': PosixPath('out/trio.safetensors')}
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from lorakit.errors import LorakitError, RecipeError
from lorakit.formats.registry import LAYOUT_NAMES
from lorakit.values import MAX_FACTOR, brief, check_options, is_number


class StepKind(str, enum.Enum):
    """What a step does."""

    LOAD = "load"
    PULL = "pull"
    MERGE = "merge"
    RESIZE = "resize"
    SQUEEZE = "squeeze"
    CONVERT = "convert"
    EXTRACT = "extract"
    COMPOSE = "compose"
    SAVE = "save"
    PUSH = "push"


class Produces(str, enum.Enum):
    """The kind of value a step's name stands for in later steps."""

    ADAPTER = "adapter"  # an in-memory adapter (load, pull, merge, resize, ...)
    SAVED = "saved"  # a written output (save)
    NOTHING = "nothing"  # push


PRODUCES = {k: Produces.ADAPTER for k in StepKind}
PRODUCES[StepKind.SAVE] = Produces.SAVED
PRODUCES[StepKind.PUSH] = Produces.NOTHING

MAX_NODES = 100_000  # YAML nodes of a recipe with its aliases expanded (billion laughs)
MAX_RECIPE_CHARS = 1 << 20  # characters of a recipe file
MAX_STRING = 4096  # characters of one string field (paths, names)
POLICY_FIELDS = ("rank", "energy", "sv_ratio", "sv_fro", "sv_cumulative", "threshold", "budget",
                 "conv_rank")
FORMATS = ("peft", "diffusers", "kohya")  # what a load step may insist on
LAYOUTS = LAYOUT_NAMES  # every layout convert and save steps write
DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}
TOP_LEVEL = ("name", "description", "steps")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_HF = re.compile(r"^hf://[^/@\s]+/[^/@\s]+(@[^/\s]+)?(/\S+)?$")
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class Problem:
    """One problem in a recipe: where (step number, name, kind; field) and what.

    Example:
        >>> str(Problem("unknown merge method 'avg'", step="trio", index=3, kind="merge",
        ...             field="method"))
        "step 3 'trio' (merge), field 'method': unknown merge method 'avg'"
    """

    message: str
    step: str | None = None
    index: int | None = None  # 1-based position in ``steps``
    kind: str | None = None
    field: str | None = None

    def __str__(self) -> str:
        where = []
        if self.index is not None:
            label = f"step {self.index}"
            if self.step:
                label += f" {brief(self.step)}"
            if self.kind:
                label += f" ({self.kind})"
            where.append(label)
        if self.field:
            where.append(f"field {brief(self.field)}")
        return (", ".join(where) + ": " if where else "") + self.message

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "index": self.index, "kind": self.kind, "field": self.field,
                "message": self.message}


class _Bad(Exception):
    """A field value that fails its check (message only; the caller adds step and field)."""


# ------------------------------------------------------------------------------ field checks


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise _Bad(f"must be a non-empty string, got {_show(v)}")
    if len(v) > MAX_STRING:
        raise _Bad(f"must be at most {MAX_STRING} characters, got {len(v):,} ({brief(v)})")
    if "\0" in v:
        raise _Bad(f"must not contain a NUL character, got {brief(v)}")
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Bad(f"must be true or false, got {_show(v)}")
    return v


def _int(low: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise _Bad(f"must be an integer >= {low}, got {_show(v)}")
        return v
    return check


def _number(v: Any) -> float | int:
    if not is_number(v):
        raise _Bad(f"must be a finite number, got {_show(v)}")
    return v


def _factor(v: Any) -> float | int:
    """A weight: finite, with ``|v| <= MAX_FACTOR`` (as the CLI's --weights)."""
    if not is_number(v) or abs(v) > MAX_FACTOR:
        raise _Bad(f"must be a finite number with |value| <= {MAX_FACTOR:g}, got {_show(v)}")
    return v


def _choice(values: tuple[str, ...]) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if v not in values:
            raise _Bad(f"must be one of {', '.join(values)}, got {_show(v)}")
        return v
    return check


def _dtype(v: Any) -> str:
    if not isinstance(v, str) or v.lower() not in DTYPES:
        raise _Bad(f"must be float32, float16 or bfloat16, got {_show(v)}")
    return DTYPES[v.lower()]


def _names(v: Any) -> list[str]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
        raise _Bad(f"must be a step name or a list of step names, got {_show(v)}")
    return v


def _weights(v: Any) -> list[float]:
    if isinstance(v, str):
        try:
            v = [float(w) for w in v.split(",") if w.strip()]
        except ValueError:
            raise _Bad(f"{brief(v)} is not a comma-separated list of numbers") from None
    if not isinstance(v, list) or not all(is_number(w) and abs(w) <= MAX_FACTOR for w in v):
        raise _Bad(f"must be a list of finite numbers with |value| <= {MAX_FACTOR:g}, got "
                   f"{_show(v)}")
    return [float(w) for w in v]


def _entries(v: Any) -> list[dict[str, Any]]:
    if not isinstance(v, list) or not v or not all(isinstance(e, dict) for e in v):
        raise _Bad(f"must be a non-empty list of mappings (input, weight, top, energy, min_norm, "
                   f"min_share, module_regex), got {_show(v)}")
    return v


def _fraction(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
        raise _Bad(f"must be a number in [0, 1], got {_show(v)}")
    return v


def _regex(v: Any) -> str:
    v = _str(v)
    try:
        re.compile(v)
    except re.error as e:
        raise _Bad(f"{brief(v)} is not a regular expression ({e})") from None
    return v


def _mapping(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise _Bad(f"must be a mapping of option names to values, got {_show(v)}")
    return v


def _show(v: Any) -> str:
    """The type and a short repr (never the whole value: aliases can make it huge)."""
    return f"{type(v).__name__} {brief(v)}"


_POLICY = {"rank": _int(1), "energy": _number, "sv_ratio": _number, "sv_fro": _number,
           "sv_cumulative": _number, "threshold": _number, "budget": _number,
           "conv_rank": _int(1)}
_DEVICE = _choice(DEVICES)

# one entry of a compose step: the units of one input, then lorakit.compose.units.select
UNIT_FIELDS: dict[str, Callable[[Any], Any]] = {
    "input": _str, "weight": _factor, "top": _int(1), "energy": _fraction,
    "min_norm": _number, "min_share": _fraction, "module_regex": _regex}

SCHEMA: dict[StepKind, dict[str, Callable[[Any], Any]]] = {
    StepKind.LOAD: {"source": _str, "format": _choice(FORMATS)},
    StepKind.PULL: {"source": _str, "format": _choice(FORMATS)},
    StepKind.MERGE: {"inputs": _names, "method": _str, "weights": _weights, "options": _mapping,
                     "intersect": _bool, "extras": _choice(("error", "first", "drop")),
                     "seed": _int(0), "device": _DEVICE, **_POLICY,
                     "model": _str, "calibration": _str, "grams": _str},
    StepKind.RESIZE: {"input": _str, "device": _DEVICE, **_POLICY},
    StepKind.SQUEEZE: {"input": _str, "method": _choice(("auto", "exact", "randomized")),
                       "oversample": _int(0), "n_iter": _int(0), "seed": _int(0),
                       "device": _DEVICE, **_POLICY},
    StepKind.CONVERT: {"input": _str, "to": _choice(LAYOUTS), "component": _str},
    StepKind.EXTRACT: {"base": _str, "tuned": _str, "max_rank": _int(1),
                       "non_lora": _choice(("skip", "save")), "seed": _int(0),
                       "device": _DEVICE, "dtype": _dtype, **_POLICY},
    StepKind.COMPOSE: {"units": _entries},
    StepKind.SAVE: {"input": _str, "output": _str, "format": _choice(LAYOUTS), "dtype": _dtype,
                    "force": _bool},
    StepKind.PUSH: {"input": _str, "repo": _str, "revision": _str, "private": _bool,
                    "dry_run": _bool},
}
REQUIRED: dict[StepKind, tuple[str, ...]] = {
    StepKind.LOAD: ("source",), StepKind.PULL: ("source",), StepKind.MERGE: ("inputs", "method"),
    StepKind.RESIZE: ("input",), StepKind.SQUEEZE: ("input",), StepKind.CONVERT: ("input", "to"),
    StepKind.EXTRACT: ("base", "tuned"), StepKind.COMPOSE: ("units",),
    StepKind.SAVE: ("input", "output"),
    StepKind.PUSH: ("input", "repo"),
}
NEEDS_POLICY = (StepKind.RESIZE, StepKind.SQUEEZE, StepKind.EXTRACT)
ONE_INPUT_METHODS = ("linear", "task_arithmetic", "svd")  # as the CLI: others need two inputs


# ----------------------------------------------------------------------------------- model


@dataclass
class Step:
    """One validated step: its kind, name, position and checked field values.

    ``args`` holds the fields as written (checked and normalised: weights as floats, dtype names
    canonical); ``policy`` the :class:`~lorakit.lowrank.RankPolicy` built from the RANK-POLICY
    fields; ``options`` the merge method's options dataclass; ``path`` / ``paths`` the resolved
    local files (load source, extract base/tuned, save output).
    """

    kind: StepKind
    name: str
    index: int
    args: dict[str, Any] = field(default_factory=dict)
    policy: Any = None
    options: Any = None
    path: Path | None = None
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def inputs(self) -> list[str]:
        """The names of the steps this one reads."""
        return [name for _, name in self.refs()]

    def refs(self) -> list[tuple[str, str]]:
        """``(field, step name)`` of every reference to an earlier step."""
        if "inputs" in self.args:
            return [("inputs", n) for n in self.args["inputs"]]
        if "units" in self.args:
            return [(f"units[{i}].input", e["input"]) for i, e in enumerate(self.args["units"])
                    if isinstance(e.get("input"), str)]
        return [("input", self.args["input"])] if "input" in self.args else []


@dataclass
class Recipe:
    """A recipe read from YAML: its text (recorded verbatim in outputs), where relative paths
    start, and the validated steps.

    Example:
        >>> r = parse_recipe("steps:\\n  - load: a\\n    source: hf://org/repo\\n"
        ...                  "  - save: out\\n    input: a\\n    output: /tmp/never-here\\n")
        >>> r.sources(), r.step("out").path
        (['hf://org/repo'], PosixPath('/tmp/never-here'))
    """

    text: str
    base_dir: Path
    path: Path | None = None
    name: str | None = None
    description: str | None = None
    steps: list[Step] = field(default_factory=list)

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)

    def sources(self) -> list[str]:
        """Every input the recipe reads, as written (load/pull sources, extract checkpoints)."""
        out: list[str] = []
        for s in self.steps:
            for k in ("source", "base", "tuned"):
                if k in s.args and s.args[k] not in out:
                    out.append(s.args[k])
        return out


# ------------------------------------------------------------------------------- parsing


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (YAML would silently keep the last one)."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, (str, int, float, bool)) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {brief(key)} (first on line {seen[key] + 1})",
                key_node.start_mark)
        if isinstance(key, (str, int, float, bool)):
            seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _TooBig(Exception):
    """A YAML value past :data:`MAX_NODES` once its aliases are expanded (or one that refers
    to itself); ``where`` is its key path (``steps[2].weights``)."""

    def __init__(self, message: str, where: str | None) -> None:
        super().__init__(message)
        self.where = where


def _expanded_sizes(root: yaml.Node) -> dict[int, int]:
    """Nodes per YAML node with every alias expanded, counted once per distinct node (aliases
    share nodes, so this is linear in the text however large the expansion)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            line = node.start_mark.line + 1 if node.start_mark else "?"
            raise _TooBig(f"the value starting on line {line} refers to itself through an "
                          "alias", None)
        active.add(key)
        n = 1
        if isinstance(node, yaml.SequenceNode):
            n += sum(size(c) for c in node.value)
        elif isinstance(node, yaml.MappingNode):
            n += sum(size(k) + size(v) for k, v in node.value)
        active.discard(key)
        sizes[key] = n
        return n

    size(root)
    return sizes


def _children(node: yaml.Node) -> list[tuple[str, yaml.Node]]:
    if isinstance(node, yaml.SequenceNode):
        return [(f"[{i}]", c) for i, c in enumerate(node.value)]
    if isinstance(node, yaml.MappingNode):
        out = []
        for k, v in node.value:
            name = k.value if isinstance(k, yaml.ScalarNode) else "<key>"
            out += [(f".{name if len(name) <= 40 else name[:40] + '...'}", v), ("<key>", k)]
        return out
    return []


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a document whose expanded size passes :data:`MAX_NODES`, naming the deepest key
    whose value alone passes it."""
    sizes = _expanded_sizes(root)
    if sizes[id(root)] <= MAX_NODES:
        return
    where, node = "", root
    while True:
        big = next(((n, c) for n, c in _children(node) if sizes[id(c)] > MAX_NODES), None)
        if big is None:
            break
        where, node = where + big[0], big[1]
    raise _TooBig(f"expands to {sizes[id(node)]:,} YAML nodes through aliases (*name), past "
                  f"the limit of {MAX_NODES:,}", where.lstrip(".") or None)


def _load_yaml(text: str) -> Any:
    """``yaml.load`` with :class:`_Loader`, refusing alias bombs before anything is built."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_recipe(path: str | Path, *, force: bool = False) -> Recipe:
    """Read and validate a recipe file; relative paths in it are relative to its folder.

    Raises :class:`~lorakit.errors.RecipeError` listing every problem (nothing has run), or
    :class:`~lorakit.errors.InputNotFoundError` when the file itself cannot be read.

    Example:
        >>> recipe = load_recipe("trio.yaml")     # doctest: +SKIP
        >>> [s.name for s in recipe.steps]        # doctest: +SKIP
        ['emotion', 'imdb', 'notask', 'trio', 'small', 'as_diffusers', 'out']
    """
    from lorakit.errors import InputNotFoundError

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputNotFoundError("no such recipe file", path=path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputNotFoundError(f"cannot read the recipe ({e})", path=path) from e
    return parse_recipe(text, base_dir=path.parent, path=path, force=force)


def parse_recipe(text: str, *, base_dir: str | Path = ".", path: str | Path | None = None,
                 force: bool = False) -> Recipe:
    """Parse and validate recipe ``text``; see :func:`load_recipe` and the module docstring.

    ``force`` says whether existing outputs may be overwritten (an existing output is otherwise
    a problem reported here, before anything runs).

    Example:
        >>> r = parse_recipe("steps:\\n  - load: a\\n    source: hf://org/repo\\n"
        ...                  "  - save: out\\n    input: a\\n    output: /tmp/never-here\\n")
        >>> [(s.kind.value, s.name) for s in r.steps]
        [('load', 'a'), ('save', 'out')]
    """
    where = Path(path) if path is not None else None
    if len(text) > MAX_RECIPE_CHARS:
        raise RecipeError([Problem(f"the recipe has {len(text):,} characters, past the limit "
                                   f"of {MAX_RECIPE_CHARS:,}")], path=where)
    try:
        data = _load_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = getattr(e, "problem", None) or str(e)
        raise RecipeError([Problem(f"not valid YAML: {line}{str(what)[:200]}")],
                          path=where) from None
    except _TooBig as e:
        raise RecipeError([Problem(str(e), field=e.where)], path=where) from None
    except RecursionError:
        raise RecipeError([Problem("not valid YAML: nested too deeply")], path=where) from None
    recipe = Recipe(text=text, base_dir=Path(base_dir), path=where)
    problems = _validate(recipe, data, force)
    if problems:
        raise RecipeError(problems, path=where)
    return recipe


# ---------------------------------------------------------------------------- validation


def _validate(recipe: Recipe, data: Any, force: bool) -> list[Problem]:
    if not isinstance(data, dict):
        return [Problem(f"a recipe is a mapping with a 'steps' list, got {_show(data)}")]
    problems: list[Problem] = []
    for key in data:
        if key not in TOP_LEVEL:
            problems.append(Problem(f"unknown top-level key {brief(key)} (known: "
                                    f"{', '.join(TOP_LEVEL)})", field=str(key)))
    for key in ("name", "description"):
        if key in data and not isinstance(data[key], str):
            problems.append(Problem(f"must be a string, got {_show(data[key])}", field=key))
    recipe.name = data.get("name") if isinstance(data.get("name"), str) else None
    recipe.description = data.get("description") \
        if isinstance(data.get("description"), str) else None
    raw = data.get("steps")
    if not isinstance(raw, list) or not raw:
        problems.append(Problem("a recipe needs a non-empty list of steps", field="steps"))
        return problems
    produced: dict[str, Step] = {}  # name -> step, in order
    all_names = {}
    for i, item in enumerate(raw, 1):
        if isinstance(item, dict) and item:
            first = next(iter(item))
            if isinstance(item[first], str):
                all_names.setdefault(item[first], i)
    for i, item in enumerate(raw, 1):
        step = _step(item, i, problems)
        if step is None:
            continue
        if step.name in produced:
            problems.append(Problem(f"the name {brief(step.name)} is already used by step "
                                    f"{produced[step.name].index}", step.name, i,
                                    step.kind.value))
            continue
        _check_step(recipe, step, produced, all_names, problems, force)
        produced[step.name] = step
        recipe.steps.append(step)
    _check_outputs(recipe, problems)
    return problems


def _step(item: Any, i: int, problems: list[Problem]) -> Step | None:
    if not isinstance(item, dict) or not item:
        problems.append(Problem(f"a step is a mapping '<kind>: <name>' plus fields, got "
                                f"{_show(item)}", index=i))
        return None
    kind_key, name = next(iter(item.items()))
    try:
        kind = StepKind(kind_key)
    except ValueError:
        problems.append(Problem(f"unknown step kind {brief(kind_key)} (the first key of a step is "
                                f"its kind: {', '.join(k.value for k in StepKind)})",
                                index=i, field=str(kind_key)))
        return None
    if not isinstance(name, str) or not _NAME.match(name):
        problems.append(Problem(f"the step's name must be an identifier (letters, digits, _ . -),"
                                f" got {_show(name)}", index=i, kind=kind.value,
                                field=kind.value))
        return None
    step = Step(kind, name, i)
    schema = SCHEMA[kind]
    for key, value in list(item.items())[1:]:
        if key in StepKind._value2member_map_:
            problems.append(Problem(f"a step has one kind; {brief(key)} is a second one (start a new "
                                    f"step with '- {key}: NAME')", name, i, kind.value, str(key)))
        elif key not in schema:
            problems.append(Problem(f"unknown field (known: {', '.join(schema)})", name, i,
                                    kind.value, str(key)))
        else:
            try:
                step.args[key] = schema[key](value)
            except _Bad as e:
                problems.append(Problem(str(e), name, i, kind.value, key))
    for key in REQUIRED[kind]:
        if key not in item:
            problems.append(Problem("missing (required)", name, i, kind.value, key))
    return step


def _problem(step: Step, field_name: str | None, message: str) -> Problem:
    return Problem(message, step.name, step.index, step.kind.value, field_name)


def _check_step(recipe: Recipe, step: Step, produced: dict[str, Step], all_names: dict[str, int],
                problems: list[Problem], force: bool) -> None:
    _check_refs(step, produced, all_names, problems)
    kind = step.kind
    if kind in (StepKind.LOAD, StepKind.PULL) and "source" in step.args:
        _check_source(recipe, step, problems)
    if kind is StepKind.EXTRACT:
        for key in ("base", "tuned"):
            if key in step.args:
                p = _local(recipe, step.args[key])
                step.paths[key] = p
                if not p.exists():
                    problems.append(_problem(step, key, f"no such file or folder: {p}"))
    if kind in (StepKind.MERGE, *NEEDS_POLICY):
        _check_policy(step, problems, required=kind in NEEDS_POLICY)
    if kind is StepKind.MERGE:
        _check_merge(step, problems)
        for key in ("model", "calibration", "grams"):  # regmean's paths, relative to the recipe
            if key in step.args and _local(recipe, step.args[key]).exists():
                step.args[key] = str(_local(recipe, step.args[key]))
    if kind is StepKind.COMPOSE:
        _check_units(step, problems)
    if kind is StepKind.SAVE and "output" in step.args:
        step.path = _local(recipe, step.args["output"])
        out = step.path
        if out.exists() and not (force or step.args.get("force")):
            problems.append(_problem(step, "output", f"{out} already exists (set force: true "
                                     "on the step or run with --force)"))
    if kind is StepKind.PUSH and "repo" in step.args and not _REPO.match(step.args["repo"]):
        problems.append(_problem(step, "repo", f"{brief(step.args['repo'])} is not an Hub repo id "
                                 "'org/name'"))
    if kind in (StepKind.PULL, StepKind.PUSH) and not _hub_available():
        problems.append(_problem(step, None, "needs lorakit.hub, which this installation lacks"))


def _check_refs(step: Step, produced: dict[str, Step], all_names: dict[str, int],
                problems: list[Problem]) -> None:
    want = Produces.SAVED if step.kind is StepKind.PUSH else Produces.ADAPTER
    for key, ref in step.refs():
        if ref in produced:
            got = PRODUCES[produced[ref].kind]
            if got is not want:
                what = {Produces.ADAPTER: "an adapter", Produces.SAVED: "a written output",
                        Produces.NOTHING: "nothing"}[got]
                need = "a save step" if want is Produces.SAVED else "an adapter (load, pull, " \
                    "merge, resize, squeeze, convert or extract)"
                problems.append(_problem(step, key, f"{brief(ref)} is a {produced[ref].kind.value} "
                                         f"step ({what}); {step.kind.value} needs {need}"))
        elif ref == step.name:
            problems.append(_problem(step, key, f"{brief(ref)} is this step itself"))
        elif ref in all_names:
            problems.append(_problem(step, key, f"{brief(ref)} is defined later (step "
                                     f"{all_names[ref]}); a step can only use earlier outputs"))
        else:
            known = ", ".join(produced) or "none yet"
            problems.append(_problem(step, key, f"no step named {brief(ref)} (earlier steps: "
                                     f"{known})"))


def _local(recipe: Recipe, text: str) -> Path:
    p = Path(text).expanduser()
    return p if p.is_absolute() else recipe.base_dir / p


def is_hub(source: str) -> bool:
    """True for an ``hf://`` source.

    Example:
        >>> is_hub("hf://org/repo@main/sub"), is_hub("./adapter")
        (True, False)
    """
    return source.startswith("hf://")


def _check_source(recipe: Recipe, step: Step, problems: list[Problem]) -> None:
    src = step.args["source"]
    if is_hub(src):
        if not _HF.match(src):
            problems.append(_problem(step, "source", f"{brief(src)} is not hf://org/repo"
                                     "[@revision][/subfolder]"))
        return
    if step.kind is StepKind.PULL:
        problems.append(_problem(step, "source", f"pull takes an hf://org/repo source, got "
                                 f"{brief(src)} (use load for local files)"))
        return
    p = _local(recipe, src)
    step.path = p
    if not p.exists():
        problems.append(_problem(step, "source", f"no such file or folder: {p}"))
        return
    from lorakit.formats.detect import detect_format

    try:  # reads the header only: an LFS pointer, a corrupt or unknown file is named now
        detected, _ = detect_format(p)
    except LorakitError as e:
        problems.append(_problem(step, "source", str(e)))
        return
    fmt = step.args.get("format")
    if fmt and fmt != detected:
        problems.append(_problem(step, "format", f"{p} is a {detected} adapter, not {fmt}"))


def _hub_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("lorakit.hub") is not None
    except (ImportError, ValueError):
        return False


def _check_policy(step: Step, problems: list[Problem], required: bool) -> None:
    from lorakit.lowrank import RankPolicy

    given = {k: step.args[k] for k in POLICY_FIELDS if k in step.args}
    if not required and not any(k != "conv_rank" for k in given):
        if "conv_rank" in given:
            problems.append(_problem(step, "conv_rank", "conv_rank needs a rank policy for the "
                                     "other modules"))
        return
    if not given and required:
        problems.append(_problem(step, "rank policy", "missing: give one of "
                                 f"{', '.join(POLICY_FIELDS[:-1])}"))
        return
    try:
        step.policy = RankPolicy.from_options(**given)
    except LorakitError as e:
        name = e.key if e.key in POLICY_FIELDS else "rank policy"
        text = e.problem  # the CLI's words: name the recipe field instead of the flag
        for f in POLICY_FIELDS:
            text = text.replace(f"--{f.replace('_', '-')}", f)
        problems.append(_problem(step, name, text))


def _check_merge(step: Step, problems: list[Problem]) -> None:
    from lorakit.merge.registry import METHODS

    method = step.args.get("method")
    n = len(step.args.get("inputs", []))
    if "inputs" in step.args and n < 2 and method not in ONE_INPUT_METHODS:
        problems.append(_problem(step, "inputs", f"merge method {method} needs at least two "
                                 "inputs"))
    if "weights" in step.args and "inputs" in step.args and len(step.args["weights"]) != n:
        problems.append(_problem(step, "weights", f"{len(step.args['weights'])} weights for {n} "
                                 "inputs"))
    if method is None:
        return
    spec = METHODS.get(method)
    if spec is None:
        problems.append(_problem(step, "method", f"unknown merge method {brief(method)} (known: "
                                 f"{', '.join(sorted(METHODS))})"))
        return
    values = {k.replace("-", "_"): v for k, v in step.args.get("options", {}).items()}
    known = {f.name for f in fields(spec.options)}
    bad = [k for k in values if k not in known]
    for k in bad:
        problems.append(_problem(step, f"options.{k}", f"method {method} has no option {brief(k)} "
                                 f"(options: {', '.join(sorted(known)) or 'none'})"))
    if bad:
        return
    try:
        check_options(spec.options, values)  # types, finite, in range (as the CLI's --option)
        step.options = spec.options(**values)
    except LorakitError as e:
        problems.append(_problem(step, f"options.{e.key}" if e.key else "options", e.problem))
    except (TypeError, ValueError) as e:
        problems.append(_problem(step, "options", f"invalid options for {method}: {e}"))


def _check_units(step: Step, problems: list[Problem]) -> None:
    """Check each entry of a compose step (the list itself was checked by its schema)."""
    for i, entry in enumerate(step.args.get("units", [])):
        for key, value in entry.items():
            name = f"units[{i}].{key}"
            if key not in UNIT_FIELDS:
                problems.append(_problem(step, name, f"unknown field (known: "
                                         f"{', '.join(UNIT_FIELDS)})"))
                continue
            try:
                UNIT_FIELDS[key](value)
            except _Bad as e:
                problems.append(_problem(step, name, str(e)))
        if "input" not in entry:
            problems.append(_problem(step, f"units[{i}].input", "missing (required)"))
        if entry.get("energy") == 0:
            problems.append(_problem(step, f"units[{i}].energy", "must be in (0, 1], got 0"))


def _check_outputs(recipe: Recipe, problems: list[Problem]) -> None:
    saves = [s for s in recipe.steps if s.kind is StepKind.SAVE and s.path is not None]
    if not any(s.kind in (StepKind.SAVE, StepKind.PUSH) for s in recipe.steps) and not problems:
        problems.append(Problem("the recipe writes nothing: add a save step", field="steps"))
    seen: dict[Path, Step] = {}
    inputs = {s.path.resolve(): s for s in recipe.steps
              if s.kind is StepKind.LOAD and s.path is not None}
    inputs.update({p.resolve(): s for s in recipe.steps for p in s.paths.values()})
    for s in saves:
        out = s.path.resolve()
        if out in seen:
            problems.append(_problem(s, "output", f"{s.path} is also written by step "
                                     f"{seen[out].index} {brief(seen[out].name)}"))
        seen[out] = s
        for src, reader in inputs.items():
            if src == out or out in src.parents or (src.is_dir() and src in out.parents):
                how = "write into" if src in out.parents else "replace"
                problems.append(_problem(s, "output", f"{s.path} would {how} the input of step "
                                         f"{reader.index} {brief(reader.name)}; inputs are never "
                                         "modified"))


__all__ = ["Recipe", "Step", "StepKind", "Problem", "load_recipe", "parse_recipe", "is_hub",
           "SCHEMA", "REQUIRED", "POLICY_FIELDS"]
