"""Benchmark: resize a Llama-2-7B-shaped LoRA (rank 64, fp16, 224 modules) to rank 16.

Prints, from one run on this machine (page cache warm, best of ``--repeat``):
  * the bare load+save of the same file, in process and as a whole ``python -c`` process;
  * lorakit's resize including I/O, in process (API) and as the ``lorakit resize`` command;
  * the dense route (full SVD of ``B @ A`` in float32, what PEFT and kohya do) timed on one module
    of each shape and extrapolated to all modules, and the speed-up;
  * the error ratio of lorakit's truncation to the dense truncated SVD on those modules;
  * peak RSS of the ``lorakit resize`` process against the adapter file size.

Targets (issue 3): command <= 1.5x whole-process load+save; in process <= 3.0x bare load+save;
>= 500x faster than the dense route; error ratio <= 1 + 1e-6; peak RSS <= 2.5x the file size.

Usage: python bench/resize_llm.py [--layers 32] [--repeat 3] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

HIDDEN, INTER, RANK, NEW_RANK = 4096, 11008, 64, 16
SHAPES = {  # name: (out, in)
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTER),
}


def make_adapter(folder: Path, layers: int, seed: int = 0) -> Path:
    """A PEFT folder with random fp16 factors whose update has a decaying spectrum."""
    g = torch.Generator().manual_seed(seed)
    decay = torch.logspace(0, -3, RANK)  # (r,)
    tensors = {}
    for layer in range(layers):
        for name, (out, inp) in SHAPES.items():
            key = f"base_model.model.model.layers.{layer}.{name}"
            a = torch.randn(RANK, inp, generator=g) / inp ** 0.5  # (r, in)
            b = torch.randn(out, RANK, generator=g) * decay / RANK ** 0.5  # (out, r)
            tensors[f"{key}.lora_A.weight"] = a.half()
            tensors[f"{key}.lora_B.weight"] = b.half()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK,
              "target_modules": sorted({n.split(".")[-1] for n in SHAPES}),
              "base_model_name_or_path": "meta-llama/Llama-2-7b-hf", "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder / "adapter_model.safetensors"


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def run_process(cmd: list[str]) -> tuple[float, int]:
    """Wall time and peak RSS (bytes) of one child process."""
    t = time.perf_counter()
    pid = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(pid.pid, 0)
    wall = time.perf_counter() - t
    if status != 0:
        raise RuntimeError(f"{cmd} failed: {pid.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss * 1024


def dense_route(weights: Path, device: torch.device) -> tuple[float, float, float, int]:
    """Per shape: time a dense float32 SVD of B @ A and compare truncation errors.

    Returns (extrapolated dense time for all modules, worst error ratio with float32 output
    factors, worst ratio with fp16 output factors on both routes, modules sampled).
    """
    import lorakit
    from lorakit.lowrank import RankPolicy

    adapter = lorakit.load(weights.parent)
    n_per_shape: dict[tuple, int] = {}
    sample: dict[tuple, str] = {}
    for key, m in adapter.modules.items():
        shape = (m.out_features, m.in_features)
        n_per_shape[shape] = n_per_shape.get(shape, 0) + 1
        sample.setdefault(shape, key)
    one = adapter.copy(modules={k: adapter.modules[k] for k in sample.values()})
    policy = RankPolicy.fixed(NEW_RANK)
    small32, _ = lorakit.resize(one, policy, device=str(device), dtype=torch.float32)
    small16, _ = lorakit.resize(one, policy, device=str(device))
    total, worst32, worst16 = 0.0, 0.0, 0.0
    for shape, key in sample.items():
        m = adapter.modules[key]
        b = m.up.to(device, torch.float32) * m.scale
        a = m.down.to(device, torch.float32)
        t = time.perf_counter()
        delta = b @ a  # (out, in): what PEFT / kohya materialise
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        total += (time.perf_counter() - t) * n_per_shape[shape]
        root = s[:NEW_RANK].sqrt()
        d32 = ((u[:, :NEW_RANK] * root) @ (root[:, None] * vh[:NEW_RANK])).double()
        d16 = ((u[:, :NEW_RANK] * root).half().double()
               @ (root[:, None] * vh[:NEW_RANK]).half().double())
        ref = delta.double()
        for small, dense_k, name in ((small32, d32, "32"), (small16, d16, "16")):
            ours = small.modules[key].delta(torch.float64).to(device)
            ratio = float(torch.linalg.norm(ref - ours) / torch.linalg.norm(ref - dense_k))
            if name == "32":
                worst32 = max(worst32, ratio)
            else:
                worst16 = max(worst16, ratio)
    return total, worst32, worst16, len(sample)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    import lorakit
    from lorakit.lowrank import RankPolicy, resolve_device

    device = resolve_device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="lorakit_bench_"))
    weights = make_adapter(tmp / "llama7b_r64", args.layers)
    size = weights.stat().st_size
    out_file = tmp / "bare.safetensors"

    def bare() -> None:
        save_file(load_file(str(weights)), str(out_file), metadata={"format": "pt"})

    def ours() -> None:
        a = lorakit.load(weights.parent)
        small, _ = lorakit.resize(a, RankPolicy.fixed(NEW_RANK), device=args.device)
        lorakit.save(small, tmp / "ours", force=True)

    bare()  # warm the page cache
    t_bare = best(bare, args.repeat)
    t_ours = best(ours, args.repeat)
    py = sys.executable
    bare_cmd = [py, "-c", "import torch; from safetensors.torch import load_file, save_file; "
                f"save_file(load_file({str(weights)!r}), {str(out_file)!r})"]
    cli_cmd = [py, "-m", "lorakit.cli", "resize", str(weights.parent), "-o",
               str(tmp / "cli_out"), "--rank", str(NEW_RANK), "--force", "--quiet",
               "--device", args.device]
    t_bare_proc = min(run_process(bare_cmd)[0] for _ in range(args.repeat))
    cli_runs = [run_process(cli_cmd) for _ in range(args.repeat)]
    t_cli = min(w for w, _ in cli_runs)
    peak = max(r for _, r in cli_runs)
    t_dense, worst32, worst16, sampled = dense_route(weights, device)
    n_modules = args.layers * len(SHAPES)
    rows = [
        ("adapter", f"{n_modules} modules, rank {RANK} -> {NEW_RANK}, fp16, "
                    f"{size / 2**20:.1f} MiB, device {device}"),
        ("bare load+save (in process)", f"{t_bare:.3f} s"),
        ("bare load+save (whole process)", f"{t_bare_proc:.3f} s"),
        ("lorakit resize (in process, incl. I/O)", f"{t_ours:.3f} s"),
        ("lorakit resize (command)", f"{t_cli:.3f} s"),
        ("ratio in process / bare (target <= 3.0)", f"{t_ours / t_bare:.2f}x"),
        ("ratio command / whole-process bare (target <= 1.5)", f"{t_cli / t_bare_proc:.2f}x"),
        (f"dense route, extrapolated from {sampled} modules", f"{t_dense:.1f} s"),
        ("speed-up vs dense (in process; target >= 500)", f"{t_dense / t_ours:.0f}x"),
        ("error ratio vs dense truncated SVD, float32 factors (target <= 1+1e-6)",
         f"{worst32:.9f}"),
        ("error ratio, both routes writing fp16 factors", f"{worst16:.9f}"),
        ("peak RSS of the command / file size (target <= 2.5)",
         f"{peak / 2**20:.0f} MiB / {size / 2**20:.0f} MiB = {peak / size:.2f}x"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
