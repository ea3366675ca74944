"""Small SVD helpers shared by the subspace rules (``tsv``, ``iso_c``, ``iso_cts``, ``cart``).

These rules depend on the tasks' singular subspaces only, which an orthonormal change of basis
leaves unchanged: run on the Core Space cores ``M_t = U_B^T D_t V_A`` (``R_B x R_A``,
:func:`lorakit.merge.align.core_space`) and mapped back, they give exactly what their definitions
give on the full ``out x in`` updates, at the cost of ``R x R`` decompositions. They therefore
always run in Core Space.

Singular values below ``RANK_RTOL`` of a matrix's largest are treated as zero: the singular
vectors of a zero singular value are arbitrary, and a low-rank update has many; every rule here
keeps only directions inside the numerical rank (documented per rule).

Example:
    >>> import torch
    >>> q = procrustes(torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=torch.float64))
    >>> q.tolist()
    [[1.0, 0.0], [0.0, 1.0]]
"""

from __future__ import annotations

import torch

RANK_RTOL = 1e-6


def numerical_rank(s: torch.Tensor) -> int:
    """Singular values above ``RANK_RTOL * s[0]`` (0 for an all-zero matrix)."""
    if s.numel() == 0 or float(s[0]) <= 0:
        return 0
    return int((s > RANK_RTOL * s[0]).sum())


def top_svd(m: torch.Tensor, k: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``min(k, numerical rank)`` singular triplets ``U (p, k)``, ``S (k,)``,
    ``Vh (k, q)`` of ``m (p, q)`` (float64)."""
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    r = numerical_rank(s)
    if k is not None:
        r = min(r, max(0, k))
    return u[:, :r], s[:r], vh[:r]


def procrustes(x: torch.Tensor) -> torch.Tensor:
    """The matrix with orthonormal columns nearest ``x (p, k)`` (``P Q^T`` from ``x = P S Q^T``):
    the decorrelation step of TSV-M and Iso-CTS."""
    if x.shape[1] == 0:
        return x
    p, _, qh = torch.linalg.svd(x.double(), full_matrices=False)
    return p @ qh
