"""Job-level CPU parallelism: results in order, thread count restored, same answers as serial."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorakit import adapter as adapter_mod
from lorakit.adapter import LoraModule, check_finite
from lorakit.errors import NonFiniteError
from lorakit.lowrank import batched, threads
from lorakit.lowrank.batched import truncated_sums
from lorakit.lowrank.threads import parallel_map, workers_for


@pytest.fixture
def two_threads(monkeypatch):
    """Two intra-op threads and parallel jobs from two jobs on (restored after the test)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(threads, "MIN_JOBS_PER_WORKER", 1)
    yield
    torch.set_num_threads(before)


def test_parallel_map_keeps_order_and_restores_threads(two_threads):
    seen = []

    def job(x):
        seen.append(torch.get_num_threads())
        return x * x

    assert workers_for(5) == 2
    assert list(parallel_map(job, range(5))) == [0, 1, 4, 9, 16]
    assert seen == [1] * 5  # each job single-threaded while they run side by side
    assert torch.get_num_threads() == 2


def test_parallel_map_raises_the_jobs_error_and_restores_threads(two_threads):
    def job(x):
        if x == 3:
            raise ValueError("job 3")
        return x

    with pytest.raises(ValueError, match="job 3"):
        list(parallel_map(job, range(6)))
    assert torch.get_num_threads() == 2


def test_serial_when_one_thread_few_jobs_or_not_cpu(two_threads, monkeypatch):
    assert workers_for(4, "cuda") == 1
    monkeypatch.setattr(threads, "MIN_JOBS_PER_WORKER", 4)
    assert workers_for(7) == 1 and workers_for(8) == 2
    torch.set_num_threads(1)
    assert workers_for(100) == 1


def _items(n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    items = {}
    for j in range(n):
        out, inp = (48, 40) if j % 3 else (40, 56)  # two shape groups
        terms = [(torch.randn(out, r, generator=g, dtype=torch.float64).half(),
                  torch.randn(r, inp, generator=g, dtype=torch.float64).half(), c)
                 for r, c in ((4, 0.5), (8, -1.25), (2, 2.0))]
        items[f"m{j}"] = terms
    return items


def _dense(terms) -> np.ndarray:
    return sum(c * (b.double() @ a.double()).numpy() for b, a, c in terms)


def test_parallel_chunks_match_dense_svd_and_serial(two_threads, monkeypatch):
    monkeypatch.setattr(batched, "CHUNK_ELEMENTS", 2000)  # several chunks per shape group
    monkeypatch.setattr(batched, "FLOAT64_BELOW", 0)  # the float32 work route
    items = _items(9)
    par = truncated_sums(items, lambda key, s: 5, out_dtype=lambda key: torch.float16)
    monkeypatch.setattr(threads, "MIN_JOBS_PER_WORKER", 10**6)
    ser = truncated_sums(items, lambda key, s: 5, out_dtype=lambda key: torch.float16)
    for key, terms in items.items():
        m = _dense(terms)
        u, s, vh = np.linalg.svd(m)
        best = np.linalg.norm(m - (u[:, :5] * s[:5]) @ vh[:5])
        for res in (par[key], ser[key]):
            assert res.up.dtype == torch.float16 and tuple(res.up.shape) == (m.shape[0], 5)
            np.testing.assert_allclose(res.S.numpy()[:5], s[:5], rtol=1e-5)
            got = (res.up.double() @ res.down.double()).numpy()
            # fp16 outputs: the error is Eckart-Young's plus the output rounding
            assert np.linalg.norm(m - got) <= best + 2e-3 * np.linalg.norm(m)
        np.testing.assert_allclose(par[key].S.numpy(), ser[key].S.numpy(), rtol=1e-6, atol=1e-9)


def test_parallel_spectra_and_cores_for_a_budget(two_threads, monkeypatch):
    monkeypatch.setattr(batched, "CHUNK_ELEMENTS", 2000)
    items = _items(7, seed=1)
    cores: dict = {}
    spectra = truncated_sums(items, None, cores=cores)
    assert set(cores) == set(items) and all(r.up is None for r in spectra.values())
    again = truncated_sums(items, lambda key, s: 3, cores=cores)
    for key, terms in items.items():
        s = np.linalg.svd(_dense(terms), compute_uv=False)
        np.testing.assert_allclose(spectra[key].S.numpy()[:10], s[:10], rtol=1e-9, atol=1e-9)
        assert tuple(again[key].down.shape) == (3, terms[0][1].shape[1])


def test_check_finite_names_the_first_bad_module_in_order(two_threads, monkeypatch):
    monkeypatch.setattr(adapter_mod, "FINITE_SPAN", 1)  # one tensor per job, many jobs
    mods = {f"layer.{j}": LoraModule(torch.ones(2, 3), torch.ones(4, 2), alpha=2) for j in range(9)}
    check_finite(mods, "x.safetensors")  # all finite: no error
    mods["layer.6"].down[1, 2] = float("inf")
    mods["layer.3"].up[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="layer.3.*lora_B"):
        check_finite(mods, "x.safetensors")
    assert torch.get_num_threads() == 2
