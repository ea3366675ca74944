"""Randomized SVD: near-optimal on low-rank-plus-noise, deterministic for a seed."""

from __future__ import annotations

import numpy as np
import torch

from lorakit.lowrank import randomized_svd


def test_recovers_low_rank_plus_noise_near_optimally():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(300, 12, generator=g) @ torch.randn(12, 200, generator=g)
    m = low + 0.05 * torch.randn(300, 200, generator=g)
    u, s, vh = randomized_svd(m, 12, seed=1)
    approx = (u * s) @ vh
    sv = np.linalg.svd(m.double().numpy(), compute_uv=False)
    optimum = np.sqrt((sv[12:] ** 2).sum())
    err = np.linalg.norm(m.double().numpy() - approx.double().numpy())
    assert err <= 1.01 * optimum


def test_same_seed_same_bytes_and_batched():
    g = torch.Generator().manual_seed(2)
    m = torch.randn(3, 40, 30, generator=g)
    a = randomized_svd(m, 5, seed=7)
    b = randomized_svd(m, 5, seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert a[0].shape == (3, 40, 5) and a[1].shape == (3, 5) and a[2].shape == (3, 5, 30)
