"""Exact SVD of a sum of low-rank products, from the factors alone.

``M = sum_i c_i B_i A_i = B A`` with ``B = [c_1 B_1, ..., c_k B_k]`` ``(out, R)`` and
``A = [A_1; ...; A_k]`` ``(R, in)``. Whiten B through its small Gram matrix, ``B^T B = rb^T rb``
(Cholesky, or ``eigh`` where B is rank-deficient), so ``B = Q_b rb`` with orthonormal
``Q_b = B ib`` (``ib = rb^+``). Then ``M = Q_b (rb A)`` and the ``R x R`` matrix
``K = rb (A A^T) rb^T = W diag(sigma^2) W^T`` (one ``eigh``) gives
``M = (B ib W) diag(sigma) (sigma^-1 W^T rb A)``: ``U = B @ left``, ``Vh = right @ A`` with
``R x R`` maps ``left`` and ``right``. Cost: two Gram products ``O((out + in) R^2)``, two small
decompositions and the skinny back-projection of the kept ``k`` columns, instead of the
``O(out * in * min(out, in))`` dense SVD. Gram eigen/pivot directions below ``GRAM_RTOL`` (rank-
deficient or all-zero factors) are dropped and singular values below ``SIGMA_RTOL * s_max`` are
set to zero with zero singular vectors, so no NaN appears.

Precision: the tall Gram products and back-projections run in ``work_dtype`` (float32 for large
modules); the small decompositions always run in float64. Gram errors perturb the singular
subspaces only to second order in the truncation error (it is stationary at the optimum), so the
float32 route's rank-k error stays within ``1 + 1e-6`` of Eckart-Young (tested; bench/resize_llm.py).
In float32 a rank-deficient factor is not exactly deficient after rounding: its null directions
show as singular values at the Gram noise floor (below ``sqrt(eps32)`` of ``s_max``), not as 0.
Whatever the noise in ``W``, keeping every direction reproduces ``B A`` (``ib rb`` is the
projector onto B's row space), so a resize to full rank is exact.

Speed (2-core CPU): the ``R x R`` work runs single-threaded (:func:`small_work`): MKL's threads
make a batched 64 x 64 ``eigh`` 2.5x slower, not faster. On CPU the Gram products go through
numpy (:func:`gram_products`), whose matmul recognises a matrix times its own transpose and calls
BLAS ``syrk``: half the multiply-adds, 1.35x (MLP shapes) to 1.7x (attention shapes) faster than
torch's ``gemm`` at rank 72.

Example:
    >>> import torch
    >>> b, a = torch.randn(6, 2, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    >>> svd = factored_svd([b], [a], [2.0])
    >>> torch.allclose(svd.S, torch.linalg.svdvals(2 * b @ a)[:2])
    True
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch

from lorakit.adapter import LoraModule

GRAM_RTOL = 1e-13  # Gram eigenvalues below this fraction of the largest are null directions
CHOL_MIN_PIVOT = 1e-10  # relative squared Cholesky pivot below which eigh takes over
SIGMA_RTOL = 1e-7  # singular values below this fraction of s_max are beyond Gram precision
SINGLE_THREAD_MAX_R = 512  # batched small decompositions up to this size: one thread is faster


class FactoredSVD(NamedTuple):
    """``M = U @ diag(S) @ Vh``; ``U (..., out, p)``, ``S (..., p)`` descending, ``Vh (..., p, in)``."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


class Core(NamedTuple):
    """The small part of a batched factored SVD: ``U = B @ left``, ``Vh = right @ A``.

    Stored as the pieces ``left = ib @ W`` and ``right = diag(rinv) W^T rb`` come from, so that
    only the kept columns are ever multiplied out (:meth:`maps`).
    """

    S: torch.Tensor  # (n, R) singular values, descending, float64
    ib: torch.Tensor  # (n, R, R) B's whitening inverse (column scales folded in)
    w: torch.Tensor  # (n, R, R) eigenvectors of the core K, columns descending
    rb: torch.Tensor  # (n, R, R) B's whitening root
    rinv: torch.Tensor  # (n, R) sign(c) / sigma on live directions, 0 elsewhere

    def maps(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``left[..., :k] (n, R, k)`` and ``right[..., :k, :] (n, k, R)``."""
        wk = self.w[..., :k]  # (n, R, k)
        return self.ib @ wk, self.rinv[..., :k].unsqueeze(-1) * (wk.mT @ self.rb)

    @property
    def left(self) -> torch.Tensor:
        """``(n, R, R)``: ``U = B @ left``."""
        return self.maps(self.S.shape[-1])[0]

    @property
    def right(self) -> torch.Tensor:
        """``(n, R, R)``: ``Vh = right @ A``."""
        return self.maps(self.S.shape[-1])[1]


@contextmanager
def small_work(device: torch.device, size: int) -> Iterator[None]:
    """Run ``size x size`` batched linear algebra single-threaded on CPU (restored after).

    Example:
        >>> with small_work(torch.device("cpu"), 64):
        ...     torch.get_num_threads()
        1
    """
    if device.type != "cpu" or size > SINGLE_THREAD_MAX_R or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _whiten_eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``gram (n, R, R)``: ``(root, inv)`` with ``root = L^1/2 V^T`` and ``inv = V L^-1/2``
    restricted to eigenvalues above ``GRAM_RTOL * max`` (the others' rows/columns are zero)."""
    lam, vec = torch.linalg.eigh(gram)  # (n, R), (n, R, R) ascending
    top = lam.amax(dim=-1, keepdim=True).clamp_min(0)  # (n, 1)
    keep = (lam > GRAM_RTOL * top) & (top > 0)  # (n, R)
    sq = torch.where(keep, lam, torch.ones_like(lam)).sqrt()  # (n, R)
    root = (vec * torch.where(keep, sq, torch.zeros_like(sq)).unsqueeze(-2)).mT  # (n, R, R)
    inv = vec * torch.where(keep, 1.0 / sq, torch.zeros_like(sq)).unsqueeze(-2)  # (n, R, R)
    return root, inv


def _whiten(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(root, inv)`` with ``root^T root = gram`` and ``inv = root^+``: Cholesky (``root = L^T``,
    several times cheaper than ``eigh``) where well conditioned; items with a pivot below
    ``CHOL_MIN_PIVOT * max diag`` (rank-deficient, all-zero) go through :func:`_whiten_eigh`."""
    low, info = torch.linalg.cholesky_ex(gram)  # (n, R, R)
    piv = torch.diagonal(low, dim1=-2, dim2=-1).pow(2)  # (n, R)
    scale = torch.diagonal(gram, dim1=-2, dim2=-1).amax(-1, keepdim=True)  # (n, 1)
    ok = (info == 0) & (piv > CHOL_MIN_PIVOT * scale).all(-1) & (scale[:, 0] > 0)  # (n,)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device).expand_as(gram)
    inv = torch.linalg.solve_triangular(low.mT, eye, upper=True)  # (n, R, R) = L^-T
    root = low.mT.clone()  # (n, R, R)
    if not bool(ok.all()):
        bad = ~ok
        root[bad], inv[bad] = _whiten_eigh(gram[bad])
    return root, inv


def core_from_grams(gb: torch.Tensor, ga: torch.Tensor, coeffs: torch.Tensor | None = None,
                    col_scale: torch.Tensor | None = None) -> Core:
    """The factored SVD's small part from ``gb = B^T B`` and ``ga = A A^T`` (``(n, R, R)``).

    ``coeffs (n,)`` multiplies each item's product; ``col_scale (n, R)`` multiplies B's columns
    (per-term coefficients), both applied to the Gram matrices, never to the tall factors.
    """
    gb, ga = gb.double(), ga.double()
    if col_scale is not None:  # B is really B diag(d): scale the Gram, not the tall factor
        d = col_scale.to(device=gb.device, dtype=torch.float64)  # (n, R)
        gb = gb * d.unsqueeze(-1) * d.unsqueeze(-2)
    with small_work(gb.device, gb.shape[-1]):
        rb, ib = _whiten(gb)  # B diag(d) = (B diag(d) ib) rb
        lam, w = torch.linalg.eigh(rb @ ga @ rb.mT)  # K = C C^T with C = rb A; ascending
        lam, w = lam.flip(-1), w.flip(-1)  # (n, R), (n, R, R) descending
        sigma = lam.clamp_min(0).sqrt()  # (n, R)
        top = sigma[..., :1]
        alive = (sigma > SIGMA_RTOL * top) & (top > 0)  # (n, R)
        inv = torch.where(alive, 1.0 / torch.where(alive, sigma, torch.ones_like(sigma)),
                          torch.zeros_like(sigma))  # (n, R)
        c = (torch.ones(sigma.shape[0], dtype=sigma.dtype, device=sigma.device) if coeffs is None
             else coeffs.to(device=sigma.device, dtype=sigma.dtype))  # (n,)
        s = torch.where(alive, sigma, torch.zeros_like(sigma)) * c.abs().unsqueeze(-1)  # (n, R)
        if col_scale is not None:
            ib = d.unsqueeze(-1) * ib  # U = B diag(d) ib W
    return Core(s, ib, w, rb, inv * torch.sign(c).unsqueeze(-1))


def _numpy_ok(*ts: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)
               and not t.requires_grad for t in ts)


def _numpy_bmm(x, y, out) -> None:  # type: ignore[no-untyped-def]
    """``out[j] = x[j] @ y[j]`` for numpy arrays, one 2-D BLAS call per item (numpy's BLAS, and
    ``syrk`` where ``x[j]`` is ``y[j]`` transposed)."""
    import numpy as np

    for j in range(out.shape[0]):
        np.matmul(x[j], y[j], out=out[j])


def gram_products(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``b^T b`` and ``a a^T`` ``(n, R, R)`` for ``b (n, out, R)`` and ``a (n, R, in)``, in their
    dtype.

    CPU float32/float64 tensors go through numpy's matmul, which hands ``x^T x`` to BLAS ``syrk``
    (one triangle, half the multiply-adds) where torch runs a full ``gemm``; other devices and
    dtypes, and tensors that need gradients, use torch.

    Example:
        >>> gb, ga = gram_products(torch.ones(1, 3, 2), torch.ones(1, 2, 5))
        >>> gb[0].tolist(), ga[0].tolist()
        ([[3.0, 3.0], [3.0, 3.0]], [[5.0, 5.0], [5.0, 5.0]])
    """
    if not _numpy_ok(b, a):
        return b.mT @ b, a @ a.mT
    n, r = b.shape[0], b.shape[-1]
    gb = torch.empty(n, r, r, dtype=b.dtype)  # (n, R, R)
    ga = torch.empty(n, r, r, dtype=a.dtype)  # (n, R, R)
    bn, an = b.numpy(), a.numpy()  # views, no copies
    _numpy_bmm(bn.transpose(0, 2, 1), bn, gb.numpy())
    _numpy_bmm(an, an.transpose(0, 2, 1), ga.numpy())
    return gb, ga


def factored_core(b: torch.Tensor, a: torch.Tensor, coeffs: torch.Tensor | None = None,
                  col_scale: torch.Tensor | None = None) -> Core:
    """Gram products of ``b (n, out, R)`` and ``a (n, R, in)`` (in their dtype) and the small
    decompositions (float64): see :func:`core_from_grams`.

    Example:
        >>> core = factored_core(torch.randn(2, 9, 3), torch.randn(2, 3, 7))
        >>> tuple(core.left.shape), tuple(core.S.shape)
        ((2, 3, 3), (2, 3))
    """
    return core_from_grams(*gram_products(b, a), coeffs, col_scale)  # (n, R, R) each


def back_project(core: Core, b: torch.Tensor, a: torch.Tensor, rank: int,
                 weights: torch.Tensor | None = None,
                 out: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``rank`` ``U (n, out, k)`` and ``Vh (n, k, in)`` in ``b``'s dtype.

    ``weights (n, k)`` scale column ``j`` of U and row ``j`` of Vh (folded into the small maps,
    no extra pass over the outputs): ``sqrt(S)`` gives balanced LoRA factors directly.
    ``out``: contiguous ``(n, out, k)`` and ``(n, k, in)`` tensors to write into (reused work
    buffers spare the page faults of fresh outputs).
    """
    k = max(0, min(rank, core.S.shape[-1]))
    with small_work(core.S.device, core.S.shape[-1]):
        left, right = core.maps(k)  # (n, R, k), (n, k, R)
        if weights is not None:
            w = weights[..., :k].to(left.dtype)  # (n, k)
            left, right = left * w.unsqueeze(-2), w.unsqueeze(-1) * right
    right = right.to(a.dtype)  # (n, k, R)
    if out is None:
        up = b @ left.to(b.dtype)  # (n, out, k)
        down = torch.empty(*right.shape[:-1], a.shape[-1], dtype=a.dtype, device=a.device)
    else:
        up = torch.matmul(b, left.to(b.dtype), out=out[0])  # (n, out, k)
        down = out[1]  # (n, k, in)
    if _numpy_ok(right, a, down) and down.is_contiguous():
        # numpy's BLAS (OpenBLAS) runs this wide product 20-25% faster than torch's
        _numpy_bmm(right.numpy(), a.numpy(), down.numpy())
    else:
        torch.matmul(right, a, out=down)
    return up, down


def batched_factored_svd(B: torch.Tensor, A: torch.Tensor, *, rank: int | None = None,
                         coeffs: torch.Tensor | None = None,
                         work_dtype: torch.dtype = torch.float32,
                         device: torch.device | str | None = None) -> FactoredSVD:
    """Exact SVD of ``c * B @ A`` for a batch: ``B (n, out, R)``, ``A (n, R, in)``, optional
    per-item ``coeffs (n,)`` applied to the small core (no pass over the big factors). Returns the
    top ``rank`` triplets (default ``R``) in float64 for S and ``work_dtype`` for U and Vh.

    Example:
        >>> import torch
        >>> svd = batched_factored_svd(torch.randn(3, 8, 2), torch.randn(3, 2, 7))
        >>> tuple(svd.U.shape), tuple(svd.S.shape), tuple(svd.Vh.shape)
        ((3, 8, 2), (3, 2), (3, 2, 7))
    """
    dev = torch.device(device) if device is not None else B.device
    b = B.to(device=dev, dtype=work_dtype)  # (n, out, R)
    a = A.to(device=dev, dtype=work_dtype)  # (n, R, in)
    core = factored_core(b, a, coeffs)
    k = core.S.shape[-1] if rank is None else max(0, min(rank, core.S.shape[-1]))
    u, vh = back_project(core, b, a, k)
    return FactoredSVD(u, core.S[..., :k], vh)


def factored_svd(ups: Sequence[torch.Tensor], downs: Sequence[torch.Tensor],
                 coeffs: Sequence[float] | None = None, *, rank: int | None = None,
                 dtype: torch.dtype = torch.float64,
                 device: torch.device | str | None = None) -> FactoredSVD:
    """Exact SVD of ``sum_i coeffs[i] * ups[i] @ downs[i]`` (``ups[i] (out, r_i)``,
    ``downs[i] (r_i, in)``), never forming the ``out x in`` matrix.

    Returns ``U (out, p)``, ``S (p,)`` descending (float64) and ``Vh (p, in)`` in ``dtype`` with
    ``p = rank`` or ``R = sum r_i``; beyond the numerical rank S is 0 and U/Vh hold zero vectors.
    Conv factors are passed flattened (``LoraModule.up_matrix()`` / ``down_matrix()``).

    Example:
        >>> import torch
        >>> b1, a1 = torch.randn(5, 2, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
        >>> b2, a2 = torch.randn(5, 1, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64)
        >>> s = factored_svd([b1, b2], [a1, a2], [1.0, -0.5]).S
        >>> torch.allclose(s, torch.linalg.svdvals(b1 @ a1 - 0.5 * b2 @ a2)[:3])
        True
    """
    coeffs = [1.0] * len(ups) if coeffs is None else [float(c) for c in coeffs]
    dev = torch.device(device) if device is not None else ups[0].device
    b = torch.cat([u.to(device=dev, dtype=dtype) for u in ups], dim=1)  # (out, R)
    a = torch.cat([d.to(device=dev, dtype=dtype) for d in downs], dim=0)  # (R, in)
    d = torch.tensor([c for u, c in zip(ups, coeffs, strict=True) for _ in range(u.shape[1])],
                     dtype=torch.float64)  # (R,) per-column coefficients
    core = factored_core(b[None], a[None], col_scale=d[None])
    k = core.S.shape[-1] if rank is None else max(0, min(rank, core.S.shape[-1]))
    u, vh = back_project(core, b[None], a[None], k)
    return FactoredSVD(u[0], core.S[0, :k], vh[0])


def module_svd(module: LoraModule, dtype: torch.dtype = torch.float64) -> FactoredSVD:
    """Exact SVD of one module's update ``scale * B @ A`` (conv kernels flattened).

    Example:
        >>> m = LoraModule(torch.eye(2, 3), 3 * torch.eye(4, 2), alpha=2)
        >>> module_svd(m).S.tolist()
        [3.0, 3.0]
    """
    return factored_svd([module.up_matrix()], [module.down_matrix()], [module.scale],
                        dtype=dtype)


def singular_values(module: LoraModule) -> torch.Tensor:
    """The ``r`` singular values of ``scale * B @ A`` (float64, descending, zeros padded).

    Example:
        >>> import torch
        >>> m = LoraModule(torch.eye(2, 3), 3 * torch.eye(4, 2), alpha=2)
        >>> singular_values(m).tolist()
        [3.0, 3.0]
    """
    b, a = module.up_matrix(torch.float64), module.down_matrix(torch.float64)  # (out, r), (r, in)
    core = factored_core(b[None], a[None], torch.tensor([module.scale], dtype=torch.float64))
    return core.S[0]
