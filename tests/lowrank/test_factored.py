"""The factored SVD against an independent dense SVD (numpy/scipy, float64)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from lorakit.adapter import LoraModule, ModuleKind
from lorakit.errors import OptionError
from lorakit.lowrank import (
    batched_factored_svd,
    factored_svd,
    module_svd,
    resolve_device,
    singular_values,
)
from lorakit.lowrank.factored import small_work


def _np_sum(ups, downs, coeffs):
    return sum(c * u.double().numpy() @ d.double().numpy()
               for u, d, c in zip(ups, downs, coeffs, strict=True))


def _dense_truncation_error(dense: np.ndarray, k: int) -> float:
    s = scipy.linalg.svd(dense, compute_uv=False)
    return float(np.sqrt((s[k:] ** 2).sum()))


def _check(ups, downs, coeffs):
    """Singular values to relative 1e-6, exact reconstruction, Eckart-Young at every rank."""
    dense = _np_sum(ups, downs, coeffs)
    want = scipy.linalg.svd(dense, compute_uv=False)
    svd = factored_svd(ups, downs, coeffs)
    got = svd.S.numpy()
    assert len(got) == sum(u.shape[1] for u in ups)  # R = sum r_i, zeros at the tail
    assert np.all(np.diff(got) <= 0)
    n = min(len(got), len(want))
    scale = max(want[0], 1e-300)
    np.testing.assert_allclose(got[:n], want[:n], rtol=1e-6, atol=1e-9 * scale)
    assert np.all(got[n:] <= 1e-9 * scale)
    assert torch.isfinite(svd.U).all() and torch.isfinite(svd.Vh).all()
    recon = (svd.U * svd.S) @ svd.Vh
    norm = max(np.linalg.norm(dense), 1e-300)
    assert np.linalg.norm(recon.numpy() - dense) <= 1e-8 * norm
    for k in range(1, len(got) + 1):
        approx = ((svd.U[:, :k] * svd.S[:k]) @ svd.Vh[:k]).numpy()
        err = np.linalg.norm(dense - approx)
        assert err <= _dense_truncation_error(dense, k) * (1 + 1e-6) + 1e-12 * norm, k
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
    zero = LoraModule(torch.randn(4, 7, generator=g), torch.zeros(10, 4), alpha=4.0)
    assert singular_values(zero).tolist() == [0.0] * 4


def test_one_zero_adapter_and_a_zero_coefficient_in_a_sum():
    g = torch.Generator().manual_seed(4)
    ups = [torch.zeros(12, 3), torch.randn(12, 2, generator=g), torch.randn(12, 2, generator=g)]
    downs = [torch.randn(3, 9, generator=g), torch.randn(2, 9, generator=g),
             torch.randn(2, 9, generator=g)]
    _check(ups, downs, [1.0, 1.0, 0.0])


def test_cancelling_terms_give_a_zero_update():
    g = torch.Generator().manual_seed(9)
    b, a = torch.randn(15, 3, generator=g), torch.randn(3, 11, generator=g)
    svd = factored_svd([b, b], [a, a], [1.0, -1.0])
    assert float(svd.S.max()) <= 1e-12 * float(torch.linalg.norm(b) * torch.linalg.norm(a))
    assert torch.isfinite(svd.U).all() and torch.isfinite(svd.Vh).all()


def test_conv_module_flattened():
    g = torch.Generator().manual_seed(5)
    m = LoraModule(torch.randn(4, 6, 3, 3, generator=g), torch.randn(8, 4, 1, 1, generator=g),
                   alpha=2.0, kind=ModuleKind.CONV)
    dense = m.scale * m.up.double().reshape(8, 4).numpy() @ m.down.double().reshape(4, -1).numpy()
    np.testing.assert_allclose(singular_values(m).numpy(),
                               scipy.linalg.svd(dense, compute_uv=False)[:4], rtol=1e-6)
    _check([m.up_matrix()], [m.down_matrix()], [m.scale])
    svd = module_svd(m)
    assert svd.U.shape == (8, 4) and svd.Vh.shape == (4, 6 * 9)


@pytest.mark.parametrize("rslora", [False, True])
def test_module_scale_is_applied(rslora):
    g = torch.Generator().manual_seed(6)
    m = LoraModule(torch.randn(4, 10, generator=g), torch.randn(7, 4, generator=g), alpha=3.0,
                   rslora=rslora)
    scale = 3.0 / (2.0 if rslora else 4.0)
    dense = scale * m.up.double().numpy() @ m.down.double().numpy()
    np.testing.assert_allclose(singular_values(m).numpy(),
                               scipy.linalg.svd(dense, compute_uv=False)[:4], rtol=1e-6)
    assert singular_values(m).dtype == torch.float64


def test_batched_matches_single_with_coefficients():
    g = torch.Generator().manual_seed(7)
    b = torch.randn(3, 20, 5, generator=g, dtype=torch.float64)
    a = torch.randn(3, 5, 15, generator=g, dtype=torch.float64)
    c = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    svd = batched_factored_svd(b, a, coeffs=c, work_dtype=torch.float64)
    for i in range(3):
        dense = float(c[i]) * b[i].numpy() @ a[i].numpy()
        want = scipy.linalg.svd(dense, compute_uv=False)[:5]
        np.testing.assert_allclose(svd.S[i].numpy(), want, rtol=1e-9)
        recon = (svd.U[i] * svd.S[i]) @ svd.Vh[i]
        np.testing.assert_allclose(recon.numpy(), dense, atol=1e-10 * np.abs(dense).max())


def test_batched_float32_with_rank_deficient_and_zero_items():
    """Items needing the eigh fallback sit beside well-conditioned ones in one batch. In float32
    a duplicated column is not exactly dependent after rounding: its direction shows at the Gram
    noise floor (below sqrt(eps32) of s_max), never as NaN."""
    g = torch.Generator().manual_seed(10)
    b = torch.randn(3, 300, 6, generator=g)
    b[1, :, 3:] = b[1, :, :3]  # rank 3
    b[2] = 0  # all-zero lora_B
    a = torch.randn(3, 6, 200, generator=g)
    svd = batched_factored_svd(b, a, rank=4)
    assert torch.isfinite(svd.U).all() and torch.isfinite(svd.Vh).all()
    assert torch.all(svd.S[2] == 0) and float(svd.S[1, 3]) <= 3e-4 * float(svd.S[1, 0])
    for i in range(2):
        dense = b[i].double().numpy() @ a[i].double().numpy()
        want = scipy.linalg.svd(dense, compute_uv=False)[:4]
        np.testing.assert_allclose(svd.S[i, :3].numpy(), want[:3], rtol=1e-5)


@pytest.mark.parametrize("decay", [1e-1, 1e-3, 1e-6])
def test_float32_work_dtype_is_within_1e6_of_eckart_young(decay):
    """The float32 route's rank-k truncation error is within 1 + 1e-6 of the optimum, on
    fp16-representable factors with decaying spectra."""
    g = torch.Generator().manual_seed(8)
    d = torch.logspace(0, float(np.log10(decay)), 32)
    b = (torch.randn(600, 32, generator=g) * d).half().float()[None]  # (1, out, R)
    a = torch.randn(32, 500, generator=g).half().float()[None]  # (1, R, in)
    dense = (b[0].double() @ a[0].double()).numpy()
    for k in (4, 8, 16):
        svd = batched_factored_svd(b, a, rank=k)
        approx = ((svd.U[0].double() * svd.S[0]) @ svd.Vh[0].double()).numpy()
        assert np.linalg.norm(dense - approx) <= _dense_truncation_error(dense, k) * (1 + 1e-6)


def test_float32_route_beats_the_dense_float32_svd_on_a_tiny_tail():
    """When the dropped tail is 1e-5 of the kept part, float32 output rounding dominates; the
    factored route still stays far closer to the optimum than the dense float32 SVD."""
    g = torch.Generator().manual_seed(0)
    k, r = 6, 24
    d = torch.cat([torch.ones(k), 1e-5 * torch.ones(r - k)])
    b = torch.linalg.qr(torch.randn(500, r, generator=g))[0] * d  # (out, R)
    a = torch.linalg.qr(torch.randn(400, r, generator=g))[0].T.contiguous()  # (R, in)
    dense = b.double() @ a.double()
    opt = _dense_truncation_error(dense.numpy(), k)
    svd = batched_factored_svd(b[None], a[None], rank=k)
    ours = float(torch.linalg.norm(dense - (svd.U[0].double() * svd.S[0]) @ svd.Vh[0].double()))
    u, s, vh = torch.linalg.svd(b @ a, full_matrices=False)  # what PEFT and kohya run
    theirs = float(torch.linalg.norm(dense - ((u[:, :k] * s[:k]) @ vh[:k]).double()))
    assert ours / opt - 1 < 1e-3 and (ours / opt - 1) * 10 < theirs / opt - 1


def test_results_cast_to_the_input_dtype_and_rank_argument():
    g = torch.Generator().manual_seed(11)
    b, a = torch.randn(20, 4, generator=g).half(), torch.randn(4, 16, generator=g).half()
    svd = factored_svd([b], [a], rank=2, dtype=torch.float32)
    assert svd.U.shape == (20, 2) and svd.S.shape == (2,) and svd.Vh.shape == (2, 16)
    assert svd.U.dtype == torch.float32 and svd.S.dtype == torch.float64
    up = (svd.U * svd.S.float().sqrt()).to(b.dtype)
    down = (svd.S.float().sqrt()[:, None] * svd.Vh).to(a.dtype)
    assert up.dtype == torch.float16 and torch.isfinite(up).all() and torch.isfinite(down).all()


def test_small_work_restores_the_thread_count():
    before = torch.get_num_threads()
    with small_work(torch.device("cpu"), 64):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with small_work(torch.device("cpu"), 4096):
        assert torch.get_num_threads() == before


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(OptionError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(OptionError, match="no CUDA device"):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(12)
    ups = [torch.randn(64, 4, generator=g), torch.randn(64, 3, generator=g)]
    downs = [torch.randn(4, 48, generator=g), torch.randn(3, 48, generator=g)]
    cpu = factored_svd(ups, downs, [1.0, -0.5])
    gpu = factored_svd(ups, downs, [1.0, -0.5], device="cuda")
    assert gpu.S.device.type == "cuda"
    np.testing.assert_allclose(gpu.S.cpu().numpy(), cpu.S.numpy(), rtol=1e-9)
