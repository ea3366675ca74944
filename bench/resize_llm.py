"""Benchmark: resize a Llama-2-7B-shaped LoRA (rank 64, fp16, 224 modules) to rank 16.

Prints, from one run on this machine (page cache warm, best of ``--repeat``):
  * the bare load+save of the same file (``safetensors.torch.load_file`` + ``save_file``), in
    process and as a whole ``python -c`` process;
  * lorakit's resize including I/O in process: through the API (``lorakit.load`` / ``resize`` /
    ``save``, format detection and checks included) and through the engine alone (safetensors
    load, LoraModules, ``resize``, safetensors save); and as the ``lorakit resize`` command;
  * where the engine's time goes (fp16 -> fp32 copies, Gram products, small decompositions,
    back-projection, output conversion);
  * the dense route (full SVD of ``B @ A`` in float32, what PEFT and kohya do) timed on one module
    of each shape and extrapolated to all modules, and the speed-up;
  * the error ratio of lorakit's truncation to the dense truncated SVD on those modules;
  * peak RSS of a clean child process (in-process route, and the command) against the file size.

Targets (issue 3): command <= 1.5x whole-process load+save; in process <= 3.0x bare load+save;
>= 500x faster than the dense route; error ratio <= 1 + 1e-6; peak RSS <= 2.5x the file size.

Usage: python bench/resize_llm.py [--layers 32] [--repeat 3] [--device cpu|cuda|auto]
       [--no-command]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
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
PREFIX = "base_model.model."


def make_adapter(folder: Path, layers: int, seed: int = 0) -> Path:
    """A PEFT folder with random fp16 factors whose update has a decaying spectrum."""
    g = torch.Generator().manual_seed(seed)
    decay = torch.logspace(0, -3, RANK)  # (r,)
    tensors = {}
    for layer in range(layers):
        for name, (out, inp) in SHAPES.items():
            key = f"{PREFIX}model.layers.{layer}.{name}"
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


# ------------------------------------------------------------------------------ the routes


def bare_load_save(weights: Path, out_file: Path, device: str = "cpu") -> None:
    """The baseline: read every tensor and write them back (``device`` is unused)."""
    save_file(load_file(str(weights)), str(out_file), metadata={"format": "pt"})


def api_resize(weights: Path, out_dir: Path, device: str) -> None:
    """lorakit.load -> lorakit.resize -> lorakit.save (what a Python user writes)."""
    import lorakit
    from lorakit.lowrank import RankPolicy

    small, _ = lorakit.resize(lorakit.load(weights.parent), RankPolicy.fixed(NEW_RANK),
                              device=device)
    lorakit.save(small, out_dir, force=True)


def engine_resize(weights: Path, out_file: Path, device: str) -> None:
    """safetensors load -> LoraModules -> resize -> safetensors save: the engine and raw I/O."""
    from lorakit.adapter import Adapter, LoraModule
    from lorakit.compress.resize import resize
    from lorakit.lowrank import RankPolicy

    sd = load_file(str(weights))
    modules = {}
    for k in [k for k in sd if k.endswith(".lora_A.weight")]:
        base = k[:-len(".lora_A.weight")]
        modules[base] = LoraModule(down=sd.pop(k), up=sd.pop(base + ".lora_B.weight"),
                                   alpha=2.0 * RANK)
    small, _ = resize(Adapter(modules=modules), RankPolicy.fixed(NEW_RANK), device=device)
    out = {}
    for key, m in small.modules.items():
        out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = m.down, m.up
    save_file(out, str(out_file), metadata={"format": "pt"})


PEAK_HOOK = ("import atexit, sys, resource\n"
             "def _peak():\n"
             "    try:\n"
             "        with open('/proc/self/status') as f:\n"
             "            kib = next(int(l.split()[1]) for l in f if l.startswith('VmHWM'))\n"
             "    except OSError:\n"
             "        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
             "    print('PEAK_KIB', kib, file=sys.stderr)\n"
             "atexit.register(_peak)\n")


def child_peak(code: str) -> int:
    """Peak RSS (bytes) of a fresh interpreter running ``code``.

    Read from ``VmHWM`` (the high-water mark of the process's own address space): a child's
    ``ru_maxrss`` also counts the parent's pages at fork/exec time, so it would report this
    benchmark's own peak instead.
    """
    res = subprocess.run([sys.executable, "-c", PEAK_HOOK + code], capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise RuntimeError(f"child failed: {res.stderr[-2000:]}")
    return int(res.stderr.split("PEAK_KIB")[-1].split()[0]) * 1024


def route_peak(route: str, weights: Path, out: Path, device: str) -> int:
    """Peak RSS of a fresh interpreter running one route of this file once."""
    return child_peak(f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                      f"import resize_llm as b\nfrom pathlib import Path\n"
                      f"b.{route}(Path({str(weights)!r}), Path({str(out)!r}), {device!r})\n")


def command_peak(argv: list[str]) -> int:
    """Peak RSS of a fresh interpreter running ``lorakit ARGV``."""
    return child_peak(f"sys.argv = {['lorakit', *argv]!r}\nfrom lorakit.cli import main\n"
                      "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e\n")


def run_process(cmd: list[str]) -> float:
    """Wall time of one child process."""
    t = time.perf_counter()
    res = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if res.returncode != 0:
        raise RuntimeError(f"{cmd} failed: {res.stderr.decode()[-2000:]}")
    return time.perf_counter() - t


# ------------------------------------------------------------------------------ analysis


def stage_profile(weights: Path, device: torch.device) -> dict[str, float]:
    """Seconds per engine stage over the whole adapter, the engine's steps timed one by one."""
    from lorakit.lowrank.batched import CHUNK_ELEMENTS
    from lorakit.lowrank.factored import back_project, core_from_grams

    sd = load_file(str(weights))
    groups: dict[tuple, list[tuple]] = defaultdict(list)
    for k in [k for k in sd if k.endswith(".lora_A.weight")]:
        a, b = sd[k], sd[k.replace("lora_A", "lora_B")]
        groups[(b.shape[0], a.shape[1])].append((b, a))
    t: dict[str, float] = defaultdict(float)

    def mark(name: str, t0: float) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        t[name] += now - t0
        return now

    for (o, i), pairs in groups.items():
        per = max(1, CHUNK_ELEMENTS // ((o + i) * RANK))
        bb = torch.empty(per, o, RANK, device=device)  # (n, out, R)
        ab = torch.empty(per, RANK, i, device=device)  # (n, R, in)
        for s in range(0, len(pairs), per):
            chunk = pairs[s:s + per]
            b, a = bb[:len(chunk)], ab[:len(chunk)]
            t0 = time.perf_counter()
            for j, (bj, aj) in enumerate(chunk):
                b[j].copy_(bj)
                a[j].copy_(aj)
            t0 = mark("fp16 -> fp32 copies", t0)
            gb, ga = b.mT @ b, a @ a.mT  # (n, R, R)
            t0 = mark("Gram products", t0)
            core = core_from_grams(gb, ga)
            t0 = mark("small decompositions", t0)
            up, down = back_project(core, b, a, NEW_RANK, core.S[:, :NEW_RANK].sqrt())
            t0 = mark("back-projection", t0)
            for j in range(len(chunk)):
                up[j].to("cpu", torch.float16), down[j].to("cpu", torch.float16)
            mark("output conversion", t0)
    return dict(t)


def dense_route(weights: Path, device: torch.device) -> tuple[float, float, float, int]:
    """Per shape: time a dense float32 SVD of B @ A and compare truncation errors.

    Returns (extrapolated dense time for all modules, worst error ratio with float32 output
    factors on both routes, worst ratio with fp16 output factors on both routes, modules sampled).
    """
    import lorakit
    from lorakit.lowrank import RankPolicy

    adapter = lorakit.load(weights.parent)
    n_per_shape: dict[tuple, int] = defaultdict(int)
    sample: dict[tuple, str] = {}
    for key, m in adapter.modules.items():
        shape = (m.out_features, m.in_features)
        n_per_shape[shape] += 1
        sample.setdefault(shape, key)
    one = adapter.copy(modules={k: adapter.modules[k] for k in sample.values()})
    policy = RankPolicy.fixed(NEW_RANK)
    small32, _ = lorakit.resize(one, policy, device=str(device), dtype=torch.float32)
    small16, _ = lorakit.resize(one, policy, device=str(device))
    total, worst32, worst16 = 0.0, 0.0, 0.0
    for shape, key in sample.items():
        m = adapter.modules[key]
        b = m.up.to(device, torch.float32) * m.scale  # (out, r)
        a = m.down.to(device, torch.float32)  # (r, in)
        t = time.perf_counter()
        delta = b @ a  # (out, in): what PEFT / kohya materialise
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        total += (time.perf_counter() - t) * n_per_shape[shape]
        root = s[:NEW_RANK].sqrt()  # (k,)
        up, down = u[:, :NEW_RANK] * root, root[:, None] * vh[:NEW_RANK]  # (out, k), (k, in)
        ref = delta.double()
        d32 = up.double() @ down.double()
        d16 = up.half().double() @ down.half().double()
        ours32 = small32.modules[key].delta(torch.float64).to(device)
        ours16 = small16.modules[key].delta(torch.float64).to(device)
        worst32 = max(worst32, float(torch.linalg.norm(ref - ours32) / torch.linalg.norm(ref - d32)))
        worst16 = max(worst16, float(torch.linalg.norm(ref - ours16) / torch.linalg.norm(ref - d16)))
    return total, worst32, worst16, len(sample)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-command", action="store_true", help="skip the whole-process timings")
    args = ap.parse_args()
    from lorakit.lowrank import resolve_device

    device = resolve_device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="lorakit_bench_"))
    try:
        run(args, device, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, device: torch.device, tmp: Path) -> None:
    """Every measurement in one run; prints the table."""
    weights = make_adapter(tmp / "llama7b_r64", args.layers)
    size = weights.stat().st_size
    n_modules = args.layers * len(SHAPES)
    bare_out, engine_out, api_out = tmp / "bare.safetensors", tmp / "engine.safetensors", tmp / "api"

    bare_load_save(weights, bare_out)  # warm the page cache
    api_resize(weights, api_out, str(device))  # and the imports
    t_bare = best(lambda: bare_load_save(weights, bare_out), args.repeat)
    t_api = best(lambda: api_resize(weights, api_out, str(device)), args.repeat)
    t_engine = best(lambda: engine_resize(weights, engine_out, str(device)), args.repeat)
    stages = stage_profile(weights, device)
    rss_api = route_peak("api_resize", weights, tmp / "api_rss", str(device))
    rss_engine = route_peak("engine_resize", weights, tmp / "engine_rss.safetensors", str(device))
    rss_bare = route_peak("bare_load_save", weights, tmp / "bare_rss.safetensors", "cpu")
    rss_torch = child_peak("import torch, safetensors.torch\n")
    t_dense, worst32, worst16, sampled = dense_route(weights, device)

    rows = [
        ("adapter", f"{n_modules} modules, rank {RANK} -> {NEW_RANK}, fp16, "
                    f"{size / 2**20:.1f} MiB, device {device}, {torch.get_num_threads()} threads"),
        ("bare load+save (in process)", f"{t_bare:.3f} s"),
        ("lorakit resize via the API (in process, incl. I/O)", f"{t_api:.3f} s"),
        ("lorakit resize, engine + raw safetensors I/O", f"{t_engine:.3f} s"),
        ("ratio API / bare (target <= 3.0)", f"{t_api / t_bare:.2f}x"),
        ("ratio engine / bare", f"{t_engine / t_bare:.2f}x"),
    ]
    rows += [(f"  engine stage: {k}", f"{v:.3f} s") for k, v in stages.items()]
    rows += [
        (f"dense route, extrapolated from {sampled} modules", f"{t_dense:.1f} s"),
        ("speed-up vs dense (API, in process; target >= 500)", f"{t_dense / t_api:.0f}x"),
        ("error ratio vs dense truncated SVD, float32 factors (target <= 1+1e-6)",
         f"{worst32:.9f}"),
        ("error ratio, both routes writing fp16 factors", f"{worst16:.9f}"),
        ("peak RSS, API route in a child / file size (target <= 2.5)",
         f"{rss_api / 2**20:.0f} MiB / {size / 2**20:.0f} MiB = {rss_api / size:.2f}x"),
        ("peak RSS, engine route in a child / file size",
         f"{rss_engine / 2**20:.0f} MiB = {rss_engine / size:.2f}x"),
        ("peak RSS, bare load+save in a child / file size",
         f"{rss_bare / 2**20:.0f} MiB = {rss_bare / size:.2f}x"),
        ("  (of which the interpreter with torch imported)", f"{rss_torch / 2**20:.0f} MiB"),
    ]
    if not args.no_command:
        py = sys.executable
        bare_cmd = [py, "-c", "import torch; from safetensors.torch import load_file, save_file; "
                    f"save_file(load_file({str(weights)!r}), {str(bare_out)!r})"]
        cli_args = ["resize", str(weights.parent), "-o", str(tmp / "cli_out"), "--rank",
                    str(NEW_RANK), "--force", "--quiet", "--device", args.device]
        t_bare_proc = min(run_process(bare_cmd) for _ in range(args.repeat))
        t_cli = min(run_process([py, "-m", "lorakit.cli", *cli_args]) for _ in range(args.repeat))
        peak = command_peak(cli_args)
        rows += [
            ("bare load+save (whole process)", f"{t_bare_proc:.3f} s"),
            ("lorakit resize (command)", f"{t_cli:.3f} s"),
            ("ratio command / whole-process bare (target <= 1.5)", f"{t_cli / t_bare_proc:.2f}x"),
            ("peak RSS of the command / file size (target <= 2.5)",
             f"{peak / 2**20:.0f} MiB = {peak / size:.2f}x"),
        ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(f"(this process's own peak RSS: "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB)")


if __name__ == "__main__":
    main()
