"""`make demo`: generate the demo adapter, inspect it, convert it to kohya and diffusers and back,
and check that every module's update ``scale * B @ A`` survived each conversion.

Runs the real CLI (``python -m lorakit.cli``) so what it shows is what a user gets.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "demo_out"


def run_cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "lorakit.cli", *args]
    print("$ lorakit " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def main() -> None:
    sys.path.insert(0, str(ROOT))
    import lorakit
    from adapters_zoo.make_demo_adapter import build
    from adapters_zoo.make_demo_adapter import main as make

    make(str(OUT / "demo_adapter"))
    run_cli("inspect", str(OUT / "demo_adapter"), "--max-rows", "12")
    run_cli("convert", str(OUT / "demo_adapter"), "--to", "kohya", "-o",
            str(OUT / "demo_kohya.safetensors"), "--force")
    run_cli("convert", str(OUT / "demo_kohya.safetensors"), "--to", "diffusers", "-o",
            str(OUT / "demo_diffusers.safetensors"), "--force")
    run_cli("convert", str(OUT / "demo_diffusers.safetensors"), "--to", "peft", "-o",
            str(OUT / "demo_roundtrip"), "--force")
    src = lorakit.load(OUT / "demo_adapter")
    worst = 0.0
    for path in ("demo_kohya.safetensors", "demo_diffusers.safetensors", "demo_roundtrip"):
        other = lorakit.load(OUT / path)
        for key, m in src.modules.items():
            d0, d1 = m.delta(), other.modules[key].delta()
            worst = max(worst, float((d0 - d1).norm() / d0.norm()))
    print(f"max relative error of scale*B@A over {len(src.modules)} modules x 3 conversions: "
          f"{worst:.2e}")
    run_cli("resize", str(OUT / "demo_adapter"), "-o", str(OUT / "demo_resized"), "--energy",
            "0.99", "--force")
    lorakit.save(build(seed=1), OUT / "demo_adapter_b", "peft", force=True)
    run_cli("merge", str(OUT / "demo_adapter"), str(OUT / "demo_adapter_b"), "--method", "svd",
            "--weights", "1,0.5", "-o", str(OUT / "demo_merged"), "--force")
    run_cli("inspect", str(OUT / "demo_merged"), "--max-rows", "6")


if __name__ == "__main__":
    main()
