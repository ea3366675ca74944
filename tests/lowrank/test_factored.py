"""The factored SVD against an independent dense SVD (numpy, float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorakit.adapter import LoraModule, ModuleKind
from lorakit.lowrank import batched_factored_svd, factored_svd, singular_values


def _np_sum(ups, downs, coeffs):
    return sum(c * u.double().numpy() @ d.double().numpy()
               for u, d, c in zip(ups, downs, coeffs, strict=True))


def _check(ups, downs, coeffs):
    dense = _np_sum(ups, downs, coeffs)
    want = np.linalg.svd(dense, compute_uv=False)
    svd = factored_svd(ups, downs, coeffs)
    got = svd.S.numpy()
    n = min(len(got), len(want))
    scale = max(want[0], 1e-300)
    np.testing.assert_allclose(got[:n], want[:n], rtol=1e-6, atol=1e-9 * scale)
    assert np.all(got[n:] <= 1e-9 * scale)
    recon = (svd.U * svd.S) @ svd.Vh
    assert np.linalg.norm(recon.numpy() - dense) <= 1e-8 * max(np.linalg.norm(dense), 1e-300)
    assert not torch.isnan(svd.U).any() and not torch.isnan(svd.Vh).any()
    return svd


def test_random_single():
    g = torch.Generator().manual_seed(0)
    _check([torch.randn(40, 6, generator=g)], [torch.randn(6, 30, generator=g)], [0.7])


def test_mixed_ranks_with_negative_coefficients():
    g = torch.Generator().manual_seed(1)
    ups = [torch.randn(50, r, generator=g) for r in (2, 8, 5)]
    downs = [torch.randn(r, 33, generator=g) for r in (2, 8, 5)]
    _check(ups, downs, [1.0, -0.5, 2.5])


def test_rank_deficient_duplicated_columns():
    g = torch.Generator().manual_seed(2)
    b = torch.randn(30, 3, generator=g)
    b = torch.cat([b, b[:, :2]], dim=1)  # (30, 5), rank 3
    a = torch.randn(5, 20, generator=g)
    svd = _check([b], [a], [1.0])
    assert int((svd.S > 1e-9 * svd.S[0]).sum()) == 3


def test_all_zero_factor_gives_zeros_not_nan():
    g = torch.Generator().manual_seed(3)
    svd = factored_svd([torch.zeros(10, 4)], [torch.randn(4, 7, generator=g)], [1.0])
    assert torch.all(svd.S == 0)
    assert torch.isfinite(svd.U).all() and torch.isfinite(svd.Vh).all()


def test_one_zero_adapter_in_a_sum():
    g = torch.Generator().manual_seed(4)
    ups = [torch.zeros(12, 3), torch.randn(12, 2, generator=g)]
    downs = [torch.randn(3, 9, generator=g), torch.randn(2, 9, generator=g)]
    _check(ups, downs, [1.0, 1.0])


def test_conv_module_flattened():
    g = torch.Generator().manual_seed(5)
    m = LoraModule(torch.randn(4, 6, 3, 3, generator=g), torch.randn(8, 4, 1, 1, generator=g),
                   alpha=2.0, kind=ModuleKind.CONV)
    dense = m.scale * m.up.double().reshape(8, 4).numpy() @ m.down.double().reshape(4, -1).numpy()
    np.testing.assert_allclose(singular_values(m).numpy(),
                               np.linalg.svd(dense, compute_uv=False)[:4], rtol=1e-6)


@pytest.mark.parametrize("rslora", [False, True])
def test_module_scale_is_applied(rslora):
    g = torch.Generator().manual_seed(6)
    m = LoraModule(torch.randn(4, 10, generator=g), torch.randn(7, 4, generator=g), alpha=3.0,
                   rslora=rslora)
    scale = 3.0 / (2.0 if rslora else 4.0)
    dense = scale * m.up.double().numpy() @ m.down.double().numpy()
    np.testing.assert_allclose(singular_values(m).numpy(),
                               np.linalg.svd(dense, compute_uv=False)[:4], rtol=1e-6)


def test_batched_matches_single():
    g = torch.Generator().manual_seed(7)
    b = torch.randn(3, 20, 5, generator=g, dtype=torch.float64)
    a = torch.randn(3, 5, 15, generator=g, dtype=torch.float64)
    svd = batched_factored_svd(b, a, work_dtype=torch.float64)
    for i in range(3):
        want = np.linalg.svd(b[i].numpy() @ a[i].numpy(), compute_uv=False)[:5]
        np.testing.assert_allclose(svd.S[i].numpy(), want, rtol=1e-9)


def test_float32_work_dtype_is_accurate_enough_for_truncation():
    """The float32 route's rank-k truncation error is within 1e-6 of Eckart-Young."""
    g = torch.Generator().manual_seed(8)
    decay = torch.logspace(0, -3, 32)
    b = (torch.randn(300, 32, generator=g) * decay)[None]
    a = torch.randn(32, 200, generator=g)[None]
    svd = batched_factored_svd(b, a, rank=8)
    dense = (b[0].double() @ a[0].double()).numpy()
    s = np.linalg.svd(dense, compute_uv=False)
    optimum = np.sqrt((s[8:] ** 2).sum())
    approx = ((svd.U[0].double() * svd.S[0]) @ svd.Vh[0].double()).numpy()
    assert np.linalg.norm(dense - approx) <= optimum * (1 + 1e-6)
