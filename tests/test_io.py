"""Output bytes are reproducible across processes (safetensors metadata order included)."""

from __future__ import annotations

import subprocess
import sys

WRITE = """
import sys, torch
import lorakit
from lorakit.adapter import Adapter, LoraModule
g = torch.Generator().manual_seed(0)
m = LoraModule(torch.randn(4, 8, generator=g), torch.randn(8, 4, generator=g), alpha=8.0)
a = Adapter(modules={"unet.mid_block.attentions.0.proj_in": m},
            metadata={"ss_output_name": "x", "ss_network_dim": "4", "modelspec.title": "t"})
lorakit.save(a, sys.argv[1], sys.argv[2])
"""


def test_kohya_and_diffusers_outputs_are_byte_identical_across_processes(tmp_path):
    for fmt in ("kohya", "diffusers"):
        outs = []
        for i in range(2):
            out = tmp_path / f"{fmt}{i}.safetensors"
            subprocess.run([sys.executable, "-c", WRITE, str(out), fmt], check=True)
            outs.append(out.read_bytes())
        assert outs[0] == outs[1], fmt


def test_written_files_read_back_in_safetensors(tmp_path):
    """lorakit's own writer: safetensors reads every dtype back exactly, with the metadata; the
    header is padded to 8 bytes and every tensor is aligned to its element size."""
    import json
    import struct

    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from lorakit.io import write_safetensors

    g = torch.Generator().manual_seed(0)
    t = {"h": torch.randn(3, 5, generator=g).half(), "d": torch.randn(7, generator=g).double(),
         "i": torch.arange(6).reshape(2, 3), "b": torch.tensor([True, False, True]),
         "bf": torch.randn(2, 3, generator=g).bfloat16(), "empty": torch.zeros(0, 4),
         "scalar": torch.tensor(3.5), "f8": torch.randn(5, generator=g).to(torch.float8_e4m3fn),
         "i8": torch.tensor([-3, 4], dtype=torch.int8), "view": torch.randn(4, 6, generator=g).mT}
    meta = {"z": "last", "a": "first", "ss_network_dim": "4"}
    p = tmp_path / "x.safetensors"
    write_safetensors(p, t, meta)
    back = load_file(str(p))
    assert set(back) == set(t)
    for k, v in t.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert torch.equal(back[k].view(torch.uint8) if v.dtype.itemsize == 1 else back[k],
                           v.contiguous().view(torch.uint8) if v.dtype.itemsize == 1 else v), k
    with safe_open(str(p), "pt") as f:
        assert f.metadata() == meta
    raw = p.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    assert list(header.pop("__metadata__")) == sorted(meta)
    sizes = {"F64": 8, "I64": 8, "F32": 4, "BF16": 2, "F16": 2, "BOOL": 1, "F8_E4M3": 1, "I8": 1}
    for e in header.values():
        assert (8 + n + e["data_offsets"][0]) % sizes[e["dtype"]] == 0, e
