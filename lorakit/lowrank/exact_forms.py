"""Exact LoRA forms ``B @ A`` of the updates LyCORIS stores in other shapes.

Every function returns ``(B, A)`` with ``B (out, R)`` and ``A (R, cols)`` whose product equals the
structured update exactly (up to the rounding of one product per entry of the factors), so the
engine's factored SVD sees the true update and a rank policy then truncates it optimally.

* Kronecker product (LoKr): ``kron(P1 @ Q1, P2 @ Q2) = kron(P1, P2) @ kron(Q1, Q2)`` (the mixed
  product rule). A full factor ``W (rows, cols)`` is written as ``W @ I_cols`` or ``I_rows @ W``,
  so ``kron(W1, P2 @ Q2) = kron(W1, P2) @ kron(I, Q2)`` or ``kron(I, P2) @ kron(W1, Q2)``; of all
  these exact forms the one of smallest rank ``R = R1 * R2`` is kept.
* Hadamard product (LoHa): ``(P1 @ Q1) * (P2 @ Q2) = (P1 . P2) @ (Q1 * Q2)``, the face-splitting
  (row-wise Kronecker) product of the left factors times the Khatri-Rao (column-wise Kronecker)
  product of the right ones, rank ``r1 * r2``. When that exceeds ``min(out, cols)`` the dense form
  is smaller and is used instead.
* Tucker cores (``hada_t1`` / ``lokr_t2`` / ``lora_mid``): the core is folded into the right factor,
  ``V[i, (q, k)] = sum_j t[i, j, k] Q[j, q]``, which keeps the rank.
* A dense update ``D (out, cols)`` is ``I_out @ D`` or ``D @ I_cols``, rank ``min(out, cols)``.

Example:
    >>> import torch
    >>> w1, p2, q2 = torch.randn(2, 3), torch.randn(4, 1), torch.randn(1, 5)
    >>> b, a = kron_form(Factor(full=w1), Factor(left=p2, right=q2))
    >>> tuple(b.shape), tuple(a.shape)       # rank 2 = rows(w1) * rank(w2)
    ((8, 2), (2, 15))
    >>> torch.allclose(b @ a, torch.kron(w1, p2 @ q2), atol=1e-6)
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Factor:
    """One factor of a Kronecker or Hadamard product: ``full (rows, cols)`` or the product
    ``left (rows, r) @ right (r, cols)``.

    Example:
        >>> Factor(left=torch.ones(4, 2), right=torch.ones(2, 3)).shape
        (4, 3)
    """

    full: torch.Tensor | None = None
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        if self.full is not None:
            return int(self.full.shape[0]), int(self.full.shape[1])
        assert self.left is not None and self.right is not None
        return int(self.left.shape[0]), int(self.right.shape[1])

    @property
    def factored(self) -> bool:
        return self.full is None

    def forms(self) -> list[tuple[str, int]]:
        """The exact writings of this factor as ``P @ Q`` with their ranks: ``"factored"`` (the
        file's own), ``"right_eye"`` (``W @ I_cols``) and ``"left_eye"`` (``I_rows @ W``)."""
        rows, cols = self.shape
        forms = [("factored", int(self.right.shape[0]))] if self.full is None else []  # type: ignore[union-attr]
        return [*forms, ("right_eye", cols), ("left_eye", rows)]

    def as_product(self, form: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(P, Q)`` of one of :meth:`forms` (None stands for an identity)."""
        if form == "factored":
            return self.left, self.right
        return (dense(self), None) if form == "right_eye" else (None, dense(self))


def _eye_or(t: torch.Tensor | None, n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device) if t is None else t


def kron(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``torch.kron`` of two matrices ``(m, n) x (p, q) -> (m * p, n * q)``; it views its inputs,
    so transposed factors (a Tucker mode) are made contiguous first."""
    return torch.kron(x.contiguous(), y.contiguous())


def kron_form(f1: Factor, f2: Factor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B @ A == kron(W1, W2)`` for factors ``W1 (a, c)``, ``W2 (b, n)``, of the
    smallest rank the mixed-product rule allows (ties: the file's own factorisation first).

    ``B`` is ``(a * b, R)`` and ``A`` is ``(R, c * n)``; a conv LoKr's ``W2`` is passed flattened
    to ``(b, d * kh * kw)``, which gives the update flattened the same way.

    Example:
        >>> b, a = kron_form(Factor(full=torch.ones(2, 2)), Factor(full=torch.ones(3, 4)))
        >>> b.shape[1]       # the smallest of 2 * 3, 2 * 4 (and the dense 6 or 8): 6
        6
    """
    (a, c), (b, n) = f1.shape, f2.shape
    like = f1.full if f1.full is not None else f1.left
    assert like is not None
    pairs = [(r1 * r2, i, j, g1, g2) for i, (g1, r1) in enumerate(f1.forms())
             for j, (g2, r2) in enumerate(f2.forms())]
    _, _, _, g1, g2 = min(pairs)  # smallest rank; ties: the file's own factorisation first
    p1, q1 = f1.as_product(g1)
    p2, q2 = f2.as_product(g2)
    left = kron(_eye_or(p1, a, like), _eye_or(p2, b, like))  # (a * b, r1 * r2)
    right = kron(_eye_or(q1, c, like), _eye_or(q2, n, like))  # (r1 * r2, c * n)
    return left, right


def hadamard_form(f1: Factor, f2: Factor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B @ A == (P1 @ Q1) * (P2 @ Q2)``: the face-splitting product of the left
    factors and the Khatri-Rao product of the right ones (rank ``r1 * r2``), or the dense form
    when ``r1 * r2 > min(out, cols)``.

    Example:
        >>> p, q = torch.randn(5, 2), torch.randn(2, 7)
        >>> b, a = hadamard_form(Factor(left=p, right=q), Factor(left=p, right=q))
        >>> b.shape[1], torch.allclose(b @ a, (p @ q) ** 2, atol=1e-5)
        (4, True)
    """
    (out, cols), (out2, cols2) = f1.shape, f2.shape
    if (out, cols) != (out2, cols2):
        raise ValueError(f"Hadamard factors differ in shape: {(out, cols)} and {(out2, cols2)}")
    if not (f1.factored and f2.factored):
        return dense_form(dense(f1) * dense(f2))
    p1, q1, p2, q2 = f1.left, f1.right, f2.left, f2.right
    assert p1 is not None and q1 is not None and p2 is not None and q2 is not None
    r1, r2 = int(q1.shape[0]), int(q2.shape[0])
    if r1 * r2 > min(out, cols):
        return dense_form(dense(f1) * dense(f2))
    left = (p1[:, :, None] * p2[:, None, :]).reshape(out, r1 * r2)  # (out, r1 * r2)
    right = (q1[:, None, :] * q2[None, :, :]).reshape(r1 * r2, cols)  # (r1 * r2, cols)
    return left, right


def dense(f: Factor) -> torch.Tensor:
    """The factor as a matrix ``(rows, cols)``."""
    if f.full is not None:
        return f.full
    assert f.left is not None and f.right is not None
    return f.left @ f.right


def dense_form(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B @ A == d`` exactly (one factor is an identity), rank ``min(d.shape)``.

    Example:
        >>> b, a = dense_form(torch.ones(2, 5))
        >>> tuple(b.shape), tuple(a.shape)
        ((2, 2), (2, 5))
    """
    out, cols = d.shape
    if out <= cols:
        return torch.eye(out, dtype=d.dtype, device=d.device), d
    return d, torch.eye(cols, dtype=d.dtype, device=d.device)


def fold_tucker(core: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Fold a Tucker core ``t (r1, r2, *kernel)`` into ``right (r2, in)``: the matrix
    ``V (r1, in * prod(kernel))`` with ``V[i, (q, k)] = sum_j t[i, j, k] right[j, q]``.

    With the other mode ``left (out, r1)`` this gives LyCORIS's ``rebuild_tucker``:
    ``W = left @ V``, reshaped ``(out, in, *kernel)``.

    Example:
        >>> fold_tucker(torch.ones(2, 3, 3, 3), torch.ones(3, 4)).shape
        torch.Size([2, 36])
    """
    r1 = int(core.shape[0])
    folded = torch.einsum("ij...,jq->iq...", core, right)  # (r1, in, *kernel)
    return folded.reshape(r1, -1)
