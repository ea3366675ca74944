"""Benchmark: a Flux.1-shaped kohya LoRA (rank 64, fp16, every double- and single-block linear:
19 x 10 + 38 x 3 = 304 modules, fused qkv and linear1 as sd-scripts writes them) resized to rank
16, and a 4-way ``svd`` merge of such files (ranks 8, 16, 16, 32 -> 32).

Prints, from one run (page cache warm, best of ``--repeat``, routes taking turns):
  * the bare load+save of the same file(s) (``safetensors.torch``), in process;
  * lorakit's resize and merge in process through the API (``lorakit.load`` with layout and family
    detection and the coverage check, the engine, ``lorakit.save`` with the kohya metadata);
  * the dense route (materialise ``scale * B @ A`` in float32, full SVD: what kohya's
    ``resize_lora.py`` and ``svd_merge_lora.py`` do), timed on one module per shape and
    extrapolated to all modules, and the speed-up;
  * the error ratio of lorakit's rank-16 truncation to the dense truncated SVD on those modules.
Whole-process ratios (``lorakit resize`` / ``lorakit merge`` commands against a bare
load+save process) are timed from outside with a paired process timer; ``--print-commands``
prints the command lines to time.

Targets (issue 16): resize in process <= 2.5x bare load+save, as a command <= 1.5x the bare
process; >= 1000x faster than the dense route; error ratio 1 + 1e-6.

Usage: python bench/resize_flux.py [--double 19] [--single 38] [--repeat 3] [--device cpu]
       [--dense-shapes 7] [--no-merge] [--keep DIR] [--print-commands]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

H = 3072  # Flux.1 hidden size; MLP ratio 4
RANK, NEW_RANK = 64, 16
MERGE_RANKS, MERGE_RANK = (8, 16, 16, 32), 32
DOUBLE = {  # BFL name in a double block: (out, in)
    "img_attn_qkv": (3 * H, H), "img_attn_proj": (H, H), "img_mlp_0": (4 * H, H),
    "img_mlp_2": (H, 4 * H), "img_mod_lin": (6 * H, H),
    "txt_attn_qkv": (3 * H, H), "txt_attn_proj": (H, H), "txt_mlp_0": (4 * H, H),
    "txt_mlp_2": (H, 4 * H), "txt_mod_lin": (6 * H, H),
}
SINGLE = {"linear1": (3 * H + 4 * H, H), "linear2": (H, H + 4 * H), "modulation_lin": (3 * H, H)}


def flux_names(double: int, single: int) -> dict[str, tuple[int, int]]:
    out = {}
    for i in range(double):
        out.update({f"lora_unet_double_blocks_{i}_{n}": s for n, s in DOUBLE.items()})
    for i in range(single):
        out.update({f"lora_unet_single_blocks_{i}_{n}": s for n, s in SINGLE.items()})
    return out


def make_kohya(file: Path, names: dict[str, tuple[int, int]], rank: int, seed: int) -> Path:
    """A kohya Flux file with random fp16 factors whose update has a decaying spectrum."""
    g = torch.Generator().manual_seed(seed)
    decay = torch.logspace(0, -3, rank)  # (r,)
    tensors = {}
    for name, (out, inp) in names.items():
        tensors[f"{name}.lora_down.weight"] = (torch.randn(rank, inp, generator=g)
                                               / inp ** 0.5).half()  # (r, in)
        tensors[f"{name}.lora_up.weight"] = (torch.randn(out, rank, generator=g) * decay
                                             / rank ** 0.5).half()  # (out, r)
        tensors[f"{name}.alpha"] = torch.tensor(float(rank) / 2, dtype=torch.float16)
    save_file(tensors, str(file), metadata={"ss_network_module": "networks.lora_flux",
                                            "ss_base_model_version": "flux1"})
    return file


def interleaved_best(fns, repeat: int) -> list[float]:
    """Best wall time of each function, the functions taking turns within each round."""
    times = [[] for _ in fns]
    for _ in range(repeat):
        for t, fn in zip(times, fns, strict=True):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [min(t) for t in times]


def dense_resize(adapter, device: torch.device, max_shapes: int):
    """Dense truncated SVD on one module per shape: (extrapolated seconds, worst error ratio of
    lorakit's fp32 truncation to the dense one, shapes sampled)."""
    import lorakit
    from lorakit.lowrank import RankPolicy

    per_shape: dict[tuple, list[str]] = defaultdict(list)
    for key, m in adapter.modules.items():
        per_shape[(m.out_features, m.in_features)].append(key)
    shapes = list(per_shape.items())[:max_shapes]
    sample = adapter.copy(modules={keys[0]: adapter.modules[keys[0]] for _, keys in shapes})
    ours, _ = lorakit.resize(sample, RankPolicy.fixed(NEW_RANK), device=str(device),
                             dtype=torch.float32)
    total, worst, timed_modules = 0.0, 0.0, 0
    for _, keys in shapes:
        m = adapter.modules[keys[0]]
        t = time.perf_counter()
        delta = m.scale * (m.up.to(device, torch.float32) @ m.down.to(device, torch.float32))
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        total += (time.perf_counter() - t) * len(keys)
        timed_modules += len(keys)
        d = (u[:, :NEW_RANK] * s[:NEW_RANK]).double() @ vh[:NEW_RANK].double()
        ref = delta.double()
        mine = ours.modules[keys[0]].delta(torch.float64).to(device)
        worst = max(worst, float(torch.linalg.norm(ref - mine) / torch.linalg.norm(ref - d)))
    total *= len(adapter.modules) / timed_modules  # shapes not sampled: same cost per module
    return total, worst, len(shapes)


def dense_merge(adapters, device: torch.device, max_shapes: int) -> float:
    """kohya's svd_merge_lora route: sum the dense updates, full SVD; extrapolated."""
    per_shape: dict[tuple, list[str]] = defaultdict(list)
    for key, m in adapters[0].modules.items():
        per_shape[(m.out_features, m.in_features)].append(key)
    shapes = list(per_shape.values())[:max_shapes]
    total, timed = 0.0, 0
    for keys in shapes:
        t = time.perf_counter()
        delta = sum(a.modules[keys[0]].scale * (a.modules[keys[0]].up.to(device, torch.float32)
                                                @ a.modules[keys[0]].down.to(device,
                                                                             torch.float32))
                    for a in adapters)
        torch.linalg.svd(delta, full_matrices=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        total += (time.perf_counter() - t) * len(keys)
        timed += len(keys)
    return total * len(adapters[0].modules) / timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--double", type=int, default=19)
    ap.add_argument("--single", type=int, default=38)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dense-shapes", type=int, default=7, help="shapes timed on the dense route")
    ap.add_argument("--no-merge", action="store_true")
    ap.add_argument("--keep", default=None, help="write the inputs here and keep them")
    ap.add_argument("--print-commands", action="store_true",
                    help="print the command lines for a whole-process timer and exit")
    args = ap.parse_args()
    from lorakit.lowrank import resolve_device

    device = resolve_device(args.device)
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lorakit_fbench_"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        run(args, device, tmp)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def commands(tmp: Path, src: Path, merge_files: list[Path], device: str) -> list[tuple[str, str]]:
    py = sys.executable
    bare = (f"{py} -c \"from safetensors.torch import load_file, save_file; "
            f"save_file(load_file('{src}'), '{tmp / 'bare_proc.safetensors'}')\"")
    resize = (f"{py} -m lorakit.cli resize {src} -o {tmp / 'cli.safetensors'} --rank {NEW_RANK}"
              f" --force --quiet --device {device}")
    out = [("bare load+save process", bare), ("lorakit resize command", resize)]
    if merge_files:
        names = " ".join(map(str, merge_files))
        out += [("bare load 4 + save 1 process",
                 f"{py} -c \"from safetensors.torch import load_file, save_file; "
                 f"sds = [load_file(f) for f in {[str(f) for f in merge_files]!r}]; "
                 f"save_file(sds[-1], '{tmp / 'bare_m.safetensors'}')\""),
                ("lorakit merge --method svd command",
                 f"{py} -m lorakit.cli merge {names} --method svd --rank {MERGE_RANK} -o "
                 f"{tmp / 'merge_cli.safetensors'} --force --quiet --device {device}")]
    return out


def run(args: argparse.Namespace, device: torch.device, tmp: Path) -> None:
    import lorakit
    from lorakit.lowrank import RankPolicy

    names = flux_names(args.double, args.single)
    src = tmp / "flux_r64.safetensors"
    if not src.exists():
        make_kohya(src, names, RANK, seed=0)
    merge_files = [] if args.no_merge else [tmp / f"flux_m{i}_r{r}.safetensors"
                                            for i, r in enumerate(MERGE_RANKS)]
    for i, (f, r) in enumerate(zip(merge_files, MERGE_RANKS)):  # noqa: B905 (none: --no-merge)
        if not f.exists():
            make_kohya(f, names, r, seed=10 + i)
    if args.print_commands:
        for label, cmd in commands(tmp, src, merge_files, args.device):
            print(f"{label}: {cmd}")
        return
    size = src.stat().st_size

    def bare() -> None:
        save_file(load_file(str(src)), str(tmp / "bare.safetensors"))

    def ours() -> None:
        small, _ = lorakit.resize(lorakit.load(src), RankPolicy.fixed(NEW_RANK),
                                  device=str(device))
        lorakit.save(small, tmp / "small.safetensors", force=True)

    bare()
    ours()
    t_bare, t_ours = interleaved_best([bare, ours], args.repeat)
    a = lorakit.load(src)
    small = lorakit.load(tmp / "small.safetensors")
    assert small.source_format == "kohya" and len(small.modules) == len(names)
    assert all(m.rank == NEW_RANK for m in small.modules.values())
    t_dense, worst, shapes = dense_resize(a, device, args.dense_shapes)
    rows = [
        ("adapter", f"Flux.1 kohya, {len(names)} modules ({args.double} double, {args.single} "
                    f"single blocks), rank {RANK} -> {NEW_RANK}, fp16, {size / 2**20:.0f} MiB, "
                    f"{torch.get_num_threads()} threads, device {device}"),
        ("bare load+save (in process)", f"{t_bare:.3f} s"),
        ("lorakit resize via the API (in process, incl. I/O)", f"{t_ours:.3f} s"),
        ("ratio resize / bare (target <= 2.5)", f"{t_ours / t_bare:.2f}x"),
        (f"dense route (kohya resize_lora), extrapolated from {shapes} shapes", f"{t_dense:.1f} s"),
        ("resize speed-up vs dense (target >= 1000)", f"{t_dense / t_ours:.0f}x"),
        ("error ratio vs dense truncated SVD (target 1 + 1e-6)", f"{worst:.9f}"),
    ]
    if merge_files:
        def bare_m() -> None:
            sds = [load_file(str(f)) for f in merge_files]
            save_file(sds[-1], str(tmp / "bare_m.safetensors"))

        def ours_m() -> None:
            ads = [lorakit.load(f) for f in merge_files]
            merged = lorakit.merge(ads, "svd", policy=RankPolicy.fixed(MERGE_RANK),
                                   device=str(device))
            lorakit.save(merged, tmp / "merged.safetensors", "kohya", force=True)

        bare_m()
        ours_m()
        tb, tm = interleaved_best([bare_m, ours_m], args.repeat)
        d_merge = dense_merge([lorakit.load(f) for f in merge_files], device, args.dense_shapes)
        msize = sum(f.stat().st_size for f in merge_files)
        rows += [
            ("merge inputs", f"4 x {len(names)} modules, ranks {MERGE_RANKS} -> {MERGE_RANK}, "
                             f"{msize / 2**20:.0f} MiB"),
            ("bare load 4 + save 1 (in process)", f"{tb:.3f} s"),
            ("lorakit svd merge (in process, incl. I/O)", f"{tm:.3f} s"),
            ("ratio merge / bare", f"{tm / tb:.2f}x"),
            ("dense svd merge route (kohya svd_merge_lora), extrapolated", f"{d_merge:.1f} s"),
            ("merge speed-up vs dense", f"{d_merge / tm:.0f}x"),
        ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
