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
