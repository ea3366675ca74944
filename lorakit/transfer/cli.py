"""``lorakit transfer``: the click command over :func:`lorakit.transfer.transfer`.

transformers and peft are imported only when the command runs, so ``lorakit --help`` works
without the ``transfer`` extra.

Example:
    $ lorakit transfer --source-model S --adapter A --target-model T --seeds seeds.jsonl \\
          --discriminator disc_add --task add -o add_on_T --baseline seeds --baseline unfiltered
    $ lorakit transfer --source-model S --train-discriminator train.jsonl --seeds seeds.jsonl \\
          --discriminator disc_add --task add --discriminator-only
"""

from __future__ import annotations

import json

import click

from lorakit.errors import OptionError


def _targets(value: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in value.split(",") if t.strip())


def _layers(value: str | None) -> tuple[int, ...] | None:
    """``"9-17"`` or ``"0,2,4"`` (or a mix) as layer indices."""
    if not value:
        return None
    out: list[int] = []
    try:
        for part in value.split(","):
            lo, _, hi = part.strip().partition("-")
            out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError as e:
        raise OptionError(f"--layers {value!r}: expected indices like 9-17 or 0,2,4") from e
    return tuple(out)


def _check_usage(kw: dict) -> None:
    if kw["discriminator_only"]:
        missing = [n for n in ("train_discriminator", "discriminator", "task") if not kw[n]]
        if missing:
            raise click.UsageError("--discriminator-only needs --train-discriminator, "
                                   "--discriminator (the output) and --task")
        return
    missing = [f"--{n.replace('_', '-')}" for n in ("adapter", "target_model", "seeds")
               if not kw[n]]
    if not kw["out"]:
        missing.append("-o/--out")
    if missing:
        raise click.UsageError(f"missing option(s): {', '.join(missing)}")
    if kw["train_discriminator"] and not kw["discriminator"]:
        raise click.UsageError("--train-discriminator needs --discriminator (where to save it)")


@click.command("transfer")
@click.option("--source-model", required=True, help="Source base model: folder, .gguf or Hub id.")
@click.option("--adapter", help="Source LoRA adapter (PEFT folder) trained on --source-model.")
@click.option("--target-model", help="Target base model: folder, .gguf or Hub id.")
@click.option("--seeds", type=click.Path(dir_okay=False),
              help="JSONL of real {input, output} examples (the first --num-seeds are used).")
@click.option("-o", "--out", help="Output PEFT folder for the transferred adapter.")
@click.option("--discriminator", help="Discriminator folder (read; written with "
              "--train-discriminator).")
@click.option("--task", help="Task name; must match the discriminator's.")
@click.option("--train-discriminator", type=click.Path(dir_okay=False),
              help="Real task data (JSONL): first train the discriminator on the source side.")
@click.option("--discriminator-only", is_flag=True, help="Only train the discriminator.")
@click.option("--discriminator-model", help="Base model of the classifier (default: the "
              "source model when training, the recorded one when loading).")
@click.option("--disc-steps", default=100, show_default=True, type=int)
@click.option("--num-seeds", default=5, show_default=True, type=int)
@click.option("--synthetic", default=200, show_default=True, type=int,
              help="Synthetic inputs to write (before filtering).")
@click.option("--shots", default=5, show_default=True, type=int, help="Seeds per prompt.")
@click.option("--temperature", default=1.0, show_default=True, type=float)
@click.option("--top-p", default=0.95, show_default=True, type=float)
@click.option("--max-input-tokens", default=48, show_default=True, type=int)
@click.option("--filter-threshold", type=float, help="Keep inputs scoring at least this "
              "(default: the discriminator's threshold).")
@click.option("--keep-top", type=float, help="Keep this fraction of best-scoring inputs instead.")
@click.option("--max-answer-tokens", default=32, show_default=True, type=int)
@click.option("--stop", default="\\n", show_default=True,
              help="Cut answers at this text (escapes like \\n allowed; '' for none).")
@click.option("--prompt-template", default="{input}\\n", show_default=True,
              help="Student prompt with {input} (escapes allowed).")
@click.option("--teacher-template", help="Teacher prompt with {input} (default: the student's).")
@click.option("--answer-prefix", default="", help="Text between prompt and answer in training "
              "text (e.g. ' ').")
@click.option("--answer-suffix", default="", help="Text after the answer in training text "
              "(e.g. '\\n').")
@click.option("--no-special-tokens", is_flag=True,
              help="Do not let the tokenizers add special tokens (BOS) to prompts.")
@click.option("--rank", default=8, show_default=True, type=int)
@click.option("--alpha", type=float, help="LoRA alpha (default 2 x rank).")
@click.option("--target-modules", default="all-linear", show_default=True,
              help="Comma-separated module names, or all-linear.")
@click.option("--layers", help="Adapt only these layers of the target (e.g. 9-17); "
              "backpropagation then stops at the lowest one.")
@click.option("--steps", default=100, show_default=True, type=int)
@click.option("--lr", default=5e-4, show_default=True, type=float)
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--baseline", "baselines", multiple=True,
              type=click.Choice(["seeds", "unfiltered", "copy"]),
              help="Also train/write this baseline (repeatable).")
@click.option("--unfiltered-size", type=click.Choice(["matched", "all"]), default="matched",
              show_default=True, help="The unfiltered baseline trains on as many synthetic inputs "
              "as the filter kept (matched: the same data budget) or on all of them.")
@click.option("--work-dir", help="Stage outputs, for resuming (default: OUT.work).")
@click.option("--source-name", help="The Hub id a local --source-model is a copy of (compared "
              "with the adapter's base_model_name_or_path).")
@click.option("--no-check-base", is_flag=True,
              help="Do not compare the adapter's base_model_name_or_path with --source-model.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--quiet", is_flag=True, help="No progress.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result.")
def transfer_cmd(**kw) -> None:
    """Move a LoRA adapter to a new base model without its training data (Trans-LoRA)."""
    _check_usage(kw)
    from lorakit.cli import provenance  # the command line as main() received it
    from lorakit.transfer.models import require_extra

    require_extra()
    from lorakit.transfer.discriminator import DiscriminatorOptions
    from lorakit.transfer.generate import GenerateOptions
    from lorakit.transfer.pipeline import (
        Baseline,
        FilterOptions,
        TransferOptions,
        UnfilteredSize,
        transfer,
    )
    from lorakit.transfer.prompts import PromptFormat
    from lorakit.transfer.source_side import build_discriminator
    from lorakit.transfer.synth import SynthOptions
    from lorakit.transfer.train import StudentOptions

    def unescape(s: str) -> str:
        try:
            return s.encode("latin-1", "backslashreplace").decode("unicode_escape")
        except UnicodeDecodeError as e:
            raise OptionError(f"bad escape in {s!r} ({e.reason})") from e

    synth = SynthOptions(count=kw["synthetic"], shots=kw["shots"],
                         max_new_tokens=kw["max_input_tokens"], temperature=kw["temperature"],
                         top_p=kw["top_p"], seed=kw["seed"])
    quiet = kw["quiet"] or kw["as_json"]
    if kw["train_discriminator"]:
        disc = build_discriminator(
            kw["source_model"], kw["train_discriminator"], kw["discriminator"], task=kw["task"],
            num_seeds=kw["num_seeds"], synthetic=synth.count, synth=synth, classifier_model=kw["discriminator_model"],
            options=DiscriminatorOptions(steps=kw["disc_steps"], seed=kw["seed"]),
            force=kw["force"], quiet=quiet)
        if kw["discriminator_only"]:
            info = {"discriminator": str(disc),
                    **json.loads((disc / "discriminator.json").read_text())}
            click.echo(json.dumps(info, indent=2) if kw["as_json"]
                       else f"discriminator for task {kw['task']!r} written to {disc} "
                            f"(held-out accuracy {info.get('holdout_accuracy')})")
            return
    teacher = kw["teacher_template"]
    options = TransferOptions(
        task=kw["task"], num_seeds=kw["num_seeds"], synth=synth,
        filter=FilterOptions(threshold=kw["filter_threshold"], keep_top=kw["keep_top"]),
        label=GenerateOptions(max_new_tokens=kw["max_answer_tokens"], stop=unescape(kw["stop"])),
        student=StudentOptions(rank=kw["rank"], alpha=kw["alpha"],
                               target_modules=_targets(kw["target_modules"]),
                               layers=_layers(kw["layers"]), steps=kw["steps"],
                               lr=kw["lr"], batch_size=kw["batch_size"], seed=kw["seed"]),
        prompt=PromptFormat(unescape(kw["prompt_template"]), unescape(kw["answer_prefix"]),
                            unescape(kw["answer_suffix"]), not kw["no_special_tokens"]),
        teacher_prompt=PromptFormat(unescape(teacher), special_tokens=not kw["no_special_tokens"])
        if teacher else None,
        baselines=tuple(Baseline(b) for b in kw["baselines"]),
        unfiltered_size=UnfilteredSize(kw["unfiltered_size"]),
        check_base=not kw["no_check_base"], source_name=kw["source_name"],
        discriminator_model=kw["discriminator_model"],
        quiet=quiet, command=provenance([])["command"])
    result = transfer(kw["source_model"], kw["adapter"], kw["target_model"], kw["seeds"],
                      kw["out"], discriminator=kw["discriminator"], work_dir=kw["work_dir"],
                      options=options, force=kw["force"])
    if kw["as_json"]:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    c = result.counts
    click.echo(f"transferred adapter written to {result.output} ({c.get('seeds')} seeds, "
               f"{c.get('synthetic_before_filter')} synthetic inputs, "
               f"{c.get('synthetic_after_filter')} kept)")
    for name, where in result.baselines.items():
        click.echo(f"baseline {name}: {where}")
