"""Benchmark: load a real LyCORIS LoKr file into exact LoRA forms, against a bare safetensors load.

Prints, from one run on this machine (page cache warm, best of ``--repeat``):
  * ``safetensors.torch.load_file`` of the file (the baseline);
  * ``lorakit.load`` (detection, checks, every module's exact LoRA form, NaN/Inf scan), its ratio
    to the baseline, and the part spent building the exact forms;
  * ``lorakit.resize`` to ``--rank`` plus ``lorakit.save`` against a bare load+save.

Default file: ../shared/real_adapters_next/sd15_lokr_kohakublueleaf_r4 (350 LoKr modules, fp16).

Usage: python bench/lycoris_load.py [FILE] [--repeat 7] [--rank 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from safetensors.torch import load_file, save_file  # noqa: E402

DEFAULT = (Path(__file__).resolve().parents[2] / "shared" / "real_adapters_next"
           / "sd15_lokr_kohakublueleaf_r4" / "smart_falcon_4_lokr.safetensors")


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", nargs="?", default=str(DEFAULT))
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--rank", type=int, default=4)
    args = ap.parse_args()
    f = Path(args.file)
    if not f.is_file():
        print(f"no such file: {f} (the real adapters live in ../shared/real_adapters_next)")
        return 1
    import lorakit
    from lorakit.formats.lycoris import read_lycoris
    from lorakit.io import read_safetensors
    from lorakit.lowrank import RankPolicy

    lorakit.load(f)  # warm the page cache and the imports
    tensors, meta = read_safetensors(f)
    bare = best(lambda: load_file(str(f)), args.repeat)
    full = best(lambda: lorakit.load(f), args.repeat)
    forms = best(lambda: read_lycoris(tensors, f, meta), args.repeat)
    a = lorakit.load(f)
    print(f"file: {f.name} ({f.stat().st_size / 2**20:.2f} MiB, {len(a.modules)} modules, "
          f"LyCORIS types {sorted({m.origin for m in a.modules.values() if m.origin})})")
    print(f"bare safetensors load_file     {bare * 1e3:8.1f} ms")
    print(f"lorakit.load (exact forms)     {full * 1e3:8.1f} ms   ratio {full / bare:6.2f}x")
    print(f"  of which exact forms + scan  {forms * 1e3:8.1f} ms")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "o.safetensors"

        def bare_io() -> None:
            save_file(load_file(str(f)), str(out))

        def resize() -> None:
            small, _ = lorakit.resize(lorakit.load(f), RankPolicy.fixed(args.rank))
            lorakit.save(small, out, "kohya", force=True)

        t_io, t_rs = best(bare_io, args.repeat), best(resize, args.repeat)
    print(f"bare load+save                 {t_io * 1e3:8.1f} ms")
    print(f"load + resize --rank {args.rank} + save  {t_rs * 1e3:8.1f} ms   ratio "
          f"{t_rs / t_io:6.2f}x")
    print("(one shared 2-core machine: ratios within this run are what count)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
