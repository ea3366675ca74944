"""Randomized SVD: near-optimal on low-rank-plus-noise, deterministic for a seed."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from lorakit.errors import OptionError
from lorakit.lowrank import randomized_svd


def _low_rank_plus_noise(seed: int, noise: float, batch: tuple[int, ...] = ()) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(*batch, 300, 12, generator=g) @ torch.randn(*batch, 12, 200, generator=g)
    return low + noise * torch.randn(*batch, 300, 200, generator=g)


def _ratio(m: torch.Tensor, u, s, vh, k: int) -> float:
    """Error of the rank-k result over the Eckart-Young optimum (scipy, float64)."""
    dense = m.double().numpy()
    sv = scipy.linalg.svd(dense, compute_uv=False)
    optimum = np.sqrt((sv[k:] ** 2).sum())
    return float(np.linalg.norm(dense - ((u * s) @ vh).double().numpy()) / optimum)


@pytest.mark.parametrize("noise", [0.05, 1.0])
def test_recovers_low_rank_plus_noise_near_optimally(noise):
    m = _low_rank_plus_noise(0, noise)
    u, s, vh = randomized_svd(m, 12, seed=1)
    assert _ratio(m, u, s, vh, 12) <= 1.01


def test_power_iterations_matter_on_heavy_noise():
    m = _low_rank_plus_noise(3, 3.0)
    plain = _ratio(m, *randomized_svd(m, 12, n_iter=0, oversample=2, seed=1), 12)
    refined = _ratio(m, *randomized_svd(m, 12, n_iter=4, oversample=2, seed=1), 12)
    assert refined < plain and refined <= 1.01


def test_batched_items_are_each_near_optimal():
    m = _low_rank_plus_noise(4, 0.1, batch=(3,))
    u, s, vh = randomized_svd(m, 12, seed=2)
    for i in range(3):
        assert _ratio(m[i], u[i], s[i], vh[i], 12) <= 1.01


def test_same_seed_same_bytes_other_seed_other_bytes():
    g = torch.Generator().manual_seed(2)
    m = torch.randn(3, 40, 30, generator=g)
    a = randomized_svd(m, 5, seed=7)
    b = randomized_svd(m, 5, seed=7)
    c = randomized_svd(m, 5, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (3, 40, 5) and a[1].shape == (3, 5) and a[2].shape == (3, 5, 30)


def test_half_input_and_rank_capped_by_shape():
    m = _low_rank_plus_noise(5, 0.0)[:20, :8].half()
    u, s, vh = randomized_svd(m, 50)
    assert u.dtype == torch.float32 and u.shape == (20, 8) and vh.shape == (8, 8)
    np.testing.assert_allclose(((u * s) @ vh).numpy(), m.float().numpy(), atol=1e-3)


@pytest.mark.parametrize("kwargs", [{"rank": 0}, {"rank": 2, "oversample": -1},
                                    {"rank": 2, "n_iter": -1}])
def test_bad_options(kwargs):
    with pytest.raises(OptionError, match="randomized SVD needs"):
        randomized_svd(torch.ones(4, 4), **kwargs)
