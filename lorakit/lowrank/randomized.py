"""Randomized SVD for genuinely dense updates (extract, TIES/DARE outputs), batched and seeded.

Halko, Martinsson & Tropp (2011): sample the range with a Gaussian test matrix of ``rank +
oversample`` columns, refine with ``n_iter`` power iterations (re-orthonormalised each time), then
take the exact SVD of the small projected matrix. The test matrix comes from a ``torch.Generator``
seeded on the CPU, so the same seed gives the same bytes on the same device.

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> m = torch.randn(50, 4, generator=g) @ torch.randn(4, 40, generator=g)
    >>> u, s, vh = randomized_svd(m, 4, seed=0)
    >>> bool(torch.allclose(u @ torch.diag(s) @ vh, m, atol=1e-4))
    True
"""

from __future__ import annotations

import torch


def _orth(y: torch.Tensor) -> torch.Tensor:
    q, _ = torch.linalg.qr(y)  # (..., m, l)
    return q


def randomized_svd(m: torch.Tensor, rank: int, *, oversample: int = 10, n_iter: int = 2,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD of ``m (..., rows, cols)``: ``U (..., rows, k)``, ``S (..., k)``,
    ``Vh (..., k, cols)`` with ``k = min(rank, rows, cols)``.
    """
    rows, cols = m.shape[-2], m.shape[-1]
    k = max(1, min(rank, rows, cols))
    ell = min(k + oversample, rows, cols)
    g = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(*m.shape[:-2], cols, ell, generator=g, dtype=torch.float32)
    omega = omega.to(device=m.device, dtype=m.dtype)  # (..., cols, ell)
    q = _orth(m @ omega)  # (..., rows, ell)
    for _ in range(n_iter):
        z = _orth(m.mT @ q)  # (..., cols, ell)
        q = _orth(m @ z)  # (..., rows, ell)
    small = q.mT @ m  # (..., ell, cols)
    ub, s, vh = torch.linalg.svd(small, full_matrices=False)
    u = q @ ub[..., :k]  # (..., rows, k)
    return u, s[..., :k], vh[..., :k, :]
