"""Benchmark: merge four Llama-2-7B-shaped LoRAs (ranks 8, 16, 16, 32; fp16) to rank 32.

Prints, from one run (page cache warm):
  * the bare load of the four inputs + save of one output (in process, and as a whole process);
  * lorakit ``svd`` merge in process (API, incl. I/O) and as the ``lorakit merge`` command;
  * the dense route for ``svd`` (PEFT's: materialise the summed update, full SVD) timed on one
    module per shape and extrapolated, and the speed-up;
  * lorakit ``ties`` (dense per module, randomized SVD) against PEFT's ``ties_svd`` route (dense
    trim/elect/merge + full SVD), extrapolated the same way;
  * lorakit ``ties --space core`` (Core Space: the cores of the stacked factors, never dense) and
    ``iso_c`` / ``tsv`` (always in Core Space) in process incl. I/O, timed in the same rounds as
    the ``svd`` merge (issue 14 target: core-space ties <= 3x svd);
  * peak RSS of each command.

Targets (issue 4): svd >= 200x faster than dense; command <= 1.5x the whole-process bare
load+save; in process <= 3.5x the bare; ties faster than the dense route, memory bounded by one
module's dense updates.

Usage: python bench/merge_llm.py [--layers 32] [--repeat 5] [--skip-ties-full]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resize_llm import SHAPES, child_peak, command_peak, run_process  # noqa: E402

RANKS = (8, 16, 16, 32)
OUT_RANK = 32


def make_adapter(folder: Path, layers: int, rank: int, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for name, (out, inp) in SHAPES.items():
            key = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, inp, generator=g)
                                               / inp ** 0.5).half()
            tensors[f"{key}.lora_B.weight"] = (torch.randn(out, rank, generator=g)
                                               / rank ** 0.5).half()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": sorted({n.split(".")[-1] for n in SHAPES}),
              "base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def interleaved_best(fns, repeat: int) -> list[float]:
    """Best wall time of each function over ``repeat`` rounds, the functions taking turns within a
    round (so that a noisy phase of the machine hits them alike)."""
    times = [[] for _ in fns]
    for _ in range(repeat):
        for t, fn in zip(times, fns, strict=True):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [min(t) for t in times]


def dense_routes(adapters, device) -> tuple[float, float, int]:
    """PEFT-style dense svd and ties_svd timed on one module per shape, extrapolated."""
    from lorakit.merge.options import DisjointMerge, SignMethod
    from lorakit.merge.sparsify import disjoint_merge, elect_sign, trim_magnitude

    first = adapters[0]
    per_shape: dict[tuple, list[str]] = {}
    for key, m in first.modules.items():
        per_shape.setdefault((m.out_features, m.in_features), []).append(key)
    t_svd = t_ties = 0.0
    for keys in per_shape.values():
        key = keys[0]
        mods = [a.modules[key] for a in adapters]
        t = time.perf_counter()
        delta = sum(m.scale * (m.up.to(device, torch.float32) @ m.down.to(device, torch.float32))
                    for m in mods)
        torch.linalg.svd(delta, full_matrices=False)
        t_svd += (time.perf_counter() - t) * len(keys)
        t = time.perf_counter()
        tau = torch.stack([m.scale * (m.up.to(device, torch.float32)
                                      @ m.down.to(device, torch.float32)) for m in mods])
        trimmed = trim_magnitude(tau, 0.2)
        merged = disjoint_merge(trimmed, elect_sign(trimmed, SignMethod.TOTAL),
                                DisjointMerge.MEAN)
        torch.linalg.svd(merged, full_matrices=False)
        t_ties += (time.perf_counter() - t) * len(keys)
    return t_svd, t_ties, len(per_shape)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--core-only", action="store_true",
                    help="Only the in-process svd merge against the Core Space merges.")
    ap.add_argument("--skip-ties-full", action="store_true",
                    help="Time lorakit's ties on 4 layers and extrapolate (faster run).")
    args = ap.parse_args()
    import lorakit
    from lorakit.lowrank import RankPolicy, resolve_device

    device = resolve_device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="lorakit_mbench_"))
    folders = [make_adapter(tmp / f"a{i}_r{r}", args.layers, r, seed=i)
               for i, r in enumerate(RANKS)]
    size = sum((f / "adapter_model.safetensors").stat().st_size for f in folders)
    out_file = tmp / "bare.safetensors"
    weights = [str(f / "adapter_model.safetensors") for f in folders]

    def bare() -> None:
        sds = [load_file(w) for w in weights]
        save_file(sds[-1], str(out_file))

    def ours_svd() -> None:
        ads = [lorakit.load(f) for f in folders]
        merged = lorakit.merge(ads, "svd", policy=RankPolicy.fixed(OUT_RANK), device=args.device)
        lorakit.save(merged, tmp / "svd_out", force=True)

    def ours_core(method: str, **kw):
        def run() -> None:
            ads = [lorakit.load(f) for f in folders]
            merged = lorakit.merge(ads, method, policy=RankPolicy.fixed(OUT_RANK),
                                   device=args.device, **kw)
            lorakit.save(merged, tmp / f"{method}_core_out", force=True)
        return run

    core_ties = ours_core("ties", space="core", density=0.2)
    bare()
    ours_svd()
    core_ties()
    t_bare, t_svd, t_core_ties, t_iso, t_tsv = interleaved_best(
        [bare, ours_svd, core_ties, ours_core("iso_c"), ours_core("tsv")], args.repeat)
    if args.core_only:
        print(f"bare load 4 + save 1 {t_bare:.3f} s; svd merge {t_svd:.3f} s; "
              f"ties --space core {t_core_ties:.3f} s ({t_core_ties / t_svd:.2f}x svd, target "
              f"<= 3); iso_c {t_iso:.3f} s ({t_iso / t_svd:.2f}x); tsv {t_tsv:.3f} s "
              f"({t_tsv / t_svd:.2f}x)")
        return
    py = sys.executable
    bare_cmd = [py, "-c", "import torch; from safetensors.torch import load_file, save_file; "
                f"sds = [load_file(w) for w in {weights!r}]; "
                f"save_file(sds[-1], {str(out_file)!r})"]
    svd_cmd = [py, "-m", "lorakit.cli", "merge", *map(str, folders), "--method", "svd", "--rank",
               str(OUT_RANK), "-o", str(tmp / "svd_cli"), "--force", "--quiet",
               "--device", args.device]
    t_bare_proc, t_svd_cli = interleaved_best(
        [lambda: run_process(bare_cmd), lambda: run_process(svd_cmd)], args.repeat)
    rss_svd = command_peak(svd_cmd[3:])
    ads = [lorakit.load(f) for f in folders]
    if args.skip_ties_full:
        sub_layers = min(4, args.layers)
        keep = [k for k in ads[0].modules if int(k.split(".")[2]) < sub_layers]
        sub = [a.copy(modules={k: a.modules[k] for k in keep}) for a in ads]
        t = time.perf_counter()
        lorakit.merge(sub, "ties", policy=RankPolicy.fixed(OUT_RANK), device=args.device)
        t_ties = (time.perf_counter() - t) * args.layers / sub_layers
        ties_note = f"(timed on {sub_layers} layers, extrapolated)"
    else:
        t = time.perf_counter()
        lorakit.merge(ads, "ties", policy=RankPolicy.fixed(OUT_RANK), device=args.device)
        t_ties = time.perf_counter() - t
        ties_note = "(all layers)"
    rss_ties_one_layer = child_peak(
        "import lorakit\nfrom lorakit.lowrank import RankPolicy\n"
        f"ads = [lorakit.load(f) for f in {list(map(str, folders))!r}]\n"
        "keep = [k for k in ads[0].modules if k.split('.')[2] == '0']\n"
        "ads = [a.copy(modules={k: a.modules[k] for k in keep}) for a in ads]\n"
        "lorakit.merge(ads, 'ties', policy=RankPolicy.fixed(32))\n")
    d_svd, d_ties, shapes = dense_routes(ads, device)
    n = args.layers * len(SHAPES)
    rows = [
        ("inputs", f"4 adapters x {n} modules, ranks {RANKS}, fp16, {size / 2**20:.0f} MiB"),
        ("bare load 4 + save 1 (in process)", f"{t_bare:.3f} s"),
        ("bare load 4 + save 1 (whole process)", f"{t_bare_proc:.3f} s"),
        ("lorakit svd merge (in process, incl. I/O)", f"{t_svd:.3f} s"),
        ("lorakit merge --method svd (command)", f"{t_svd_cli:.3f} s"),
        ("ratio in process / bare (target <= 3.5)", f"{t_svd / t_bare:.2f}x"),
        ("ratio command / whole-process bare (target <= 1.5)", f"{t_svd_cli / t_bare_proc:.2f}x"),
        (f"dense svd route (PEFT), extrapolated from {shapes} modules", f"{d_svd:.1f} s"),
        ("svd speed-up vs dense (target >= 200)", f"{d_svd / t_svd:.0f}x"),
        (f"lorakit ties {ties_note}", f"{t_ties:.1f} s"),
        ("dense ties_svd route (PEFT), extrapolated", f"{d_ties:.1f} s"),
        ("ties speed-up vs dense (target > 1)", f"{d_ties / t_ties:.1f}x"),
        ("lorakit ties --space core (in process, incl. I/O)", f"{t_core_ties:.3f} s"),
        ("ratio core-space ties / svd merge (target <= 3)", f"{t_core_ties / t_svd:.2f}x"),
        ("lorakit iso_c / tsv (Core Space, in process, incl. I/O)",
         f"{t_iso:.3f} s / {t_tsv:.3f} s"),
        ("peak RSS: svd merge command", f"{rss_svd / 2**20:.0f} MiB (inputs {size / 2**20:.0f})"),
        ("peak RSS: ties merge of one layer (bounded per module)",
         f"{rss_ties_one_layer / 2**20:.0f} MiB"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
