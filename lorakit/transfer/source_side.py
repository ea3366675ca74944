"""The source-side step: build a task's discriminator while its real data is still available.

The source model writes synthetic inputs from a few seeds (the negatives, label 0) and a LoRA
classifier learns to tell them from the real inputs (label 1).

Example:
    >>> build_discriminator("source_dir", "real.jsonl", "disc_add", task="add")  # doctest: +SKIP
"""

from __future__ import annotations

import gc
from dataclasses import replace
from pathlib import Path

from lorakit.io import check_output
from lorakit.transfer.discriminator import DiscriminatorOptions, train_discriminator
from lorakit.transfer.models import ModelRef, load_causal_lm, require_extra
from lorakit.transfer.progress import stage_progress
from lorakit.transfer.records import read_examples
from lorakit.transfer.synth import SynthOptions, synthesize


def build_discriminator(source_model: str | Path, real: str | Path, out: str | Path, *,
                        task: str, num_seeds: int = 5, synthetic: int | None = None,
                        synth: SynthOptions | None = None,
                        options: DiscriminatorOptions | None = None,
                        classifier_model: str | Path | None = None, force: bool = False,
                        quiet: bool = False) -> Path:
    """Train and save the discriminator for ``task`` from the real examples in ``real``.

    The first ``num_seeds`` real examples prompt the source model for ``synthetic`` negatives
    (default: as many as there are real examples); they are kept as ``<out>/negatives.jsonl``.
    The classifier is a LoRA on ``classifier_model`` (default: the source model).

    Example:
        >>> build_discriminator("src", "train.jsonl", "disc", task="add")  # doctest: +SKIP
    """
    require_extra()
    synth = synth or SynthOptions()
    options = options or DiscriminatorOptions()
    out = Path(out)
    check_output(out, force)
    real_examples = read_examples(real, need_output=False, min_count=num_seeds + 1)
    seeds = real_examples[:num_seeds]
    model, tok = load_causal_lm(ModelRef.parse(source_model))
    count = synthetic if synthetic is not None else len(real_examples)
    with stage_progress("synthesizing negatives (source model)", count,
                        enabled=not quiet) as adv:
        negatives = synthesize(model, tok, seeds, replace(synth, count=count), advance=adv)
    del model
    gc.collect()
    with stage_progress("training the discriminator", options.steps, enabled=not quiet) as adv:
        return train_discriminator(
            classifier_model or source_model, task, real_examples, negatives, out,
            options=options, force=force, advance=adv,
            extra_meta={"real_file": str(real), "negatives_from": str(source_model),
                        "seeds": num_seeds})
