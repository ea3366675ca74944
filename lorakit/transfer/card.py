"""The model card (README.md) and record (transfer.json) of a transferred adapter.

Example:
    >>> print(model_card({"kind": "transfer", "source_model": "s", "target_model": "t",
    ...                   "adapter": "a", "seeds": 5}).splitlines()[1])
    base_model: "t"
"""

from __future__ import annotations

import json
from typing import Any

_TITLES = {"transfer": "Trans-LoRA adapter", "seeds": "Baseline: trained on the seeds only",
           "unfiltered": "Baseline: trained on unfiltered synthetic data",
           "copy": "Baseline: source weights copied as they are"}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v)
    return str(v)


def model_card(record: dict[str, Any]) -> str:
    """Markdown with YAML front matter naming the target as ``base_model``."""
    kind = record.get("kind", "transfer")
    lines = ["---", f"base_model: {json.dumps(record['target_model'])}", "library_name: peft",
             "tags:", "- lora", "- lorakit", "- trans-lora", "---", "",
             f"# {_TITLES.get(kind, kind)}", "",
             f"Moved by [lorakit](https://pypi.org/project/lorakit/) `transfer` from the adapter "
             f"`{record['adapter']}` on `{record['source_model']}` to `{record['target_model']}` "
             "(Trans-LoRA: synthetic inputs from the target model, filtered by a discriminator, "
             "labelled by the source model with its adapter, distilled into a new LoRA).", "",
             "| field | value |", "|---|---|"]
    rows = [("task", record.get("task")), ("source model", record["source_model"]),
            ("source adapter", record["adapter"]), ("target model", record["target_model"]),
            ("seed examples", record.get("seeds")),
            ("synthetic inputs before filtering", record.get("synthetic_before_filter")),
            ("synthetic inputs after filtering", record.get("synthetic_after_filter")),
            ("filter", record.get("filter")), ("discriminator", record.get("discriminator")),
            ("training examples", record.get("train_examples"))]
    for k, v in (record.get("training") or {}).items():
        rows.append((f"training {k}", v))
    rows += [("final training loss", record.get("final_loss")),
             ("command", f"`{record['command']}`" if record.get("command") else None)]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows if v is not None]
    return "\n".join(lines) + "\n"
