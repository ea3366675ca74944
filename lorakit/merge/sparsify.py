"""Element-wise building blocks of TIES, DARE and magnitude pruning, on dense task updates.

All functions are pure: they take ``tau (n, ...)`` (one dense update per task, weights already
applied) and return new tensors.

* :func:`trim_magnitude` keeps the ``density`` fraction of largest-magnitude entries of each task.
* :func:`dare_drop` drops entries with probability ``1 - density`` and rescales survivors by
  ``1 / density`` (seeded).
* :func:`elect_sign` picks each entry's sign by the summed values (``total``) or by the count of
  positive vs negative entries (``frequency``).
* :func:`disjoint_merge` combines the entries that agree with the elected sign (mean or sum).

Example:
    >>> import torch
    >>> tau = torch.tensor([[3.0, -1.0], [1.0, 2.0]])
    >>> disjoint_merge(tau, elect_sign(tau, SignMethod.TOTAL), DisjointMerge.MEAN).tolist()
    [2.0, 2.0]
"""

from __future__ import annotations

import torch

from lorakit.merge.options import DisjointMerge, SignMethod


def magnitude_threshold(values: torch.Tensor, density: float) -> torch.Tensor:
    """The magnitude at or above which ``density`` of ``values`` (flattened) lie."""
    flat = values.abs().reshape(-1)
    k = int(round(density * flat.numel()))
    if k <= 0:
        return flat.new_tensor(float("inf"))
    if k >= flat.numel():
        return flat.new_tensor(0.0)
    return torch.topk(flat, k, sorted=False).values.min()


def kth_largest(mag: torch.Tensor, k: int, sample: int = 1 << 13) -> torch.Tensor:
    """The exact ``k``-th largest value of the 1-D ``mag`` (``1 <= k <= numel``).

    A seeded sample brackets the answer, so the exact selection (``kthvalue``) runs only on the
    few values inside the bracket; if the bracket misses, the full selection runs instead.
    """
    n = mag.numel()
    if n <= 4 * sample:
        return torch.kthvalue(mag, n - k + 1).values
    g = torch.Generator(device="cpu").manual_seed(n)
    idx = torch.randint(0, n, (sample,), generator=g).to(mag.device)
    probe = mag[idx]  # (sample,)
    q = 1.0 - k / n
    margin = 5.0 / sample ** 0.5
    lo = torch.kthvalue(probe, max(1, int((q - margin) * sample))).values
    hi = torch.kthvalue(probe, min(sample, int((q + margin) * sample) + 1)).values
    above = int(torch.count_nonzero(mag > hi))
    band = mag[(mag >= lo) & (mag <= hi)]
    need = k - above  # rank of the answer inside the band, counted from the top
    if 1 <= need <= band.numel():
        return torch.kthvalue(band, band.numel() - need + 1).values
    return torch.kthvalue(mag, n - k + 1).values


def trim_magnitude(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep each task's top-``density`` entries by magnitude; ``tau (n, ...)``.

    The cut is the exact k-th largest magnitude (:func:`kth_largest`); entries tied with it are
    kept too (measure-zero for real-valued updates).
    """
    out = torch.zeros_like(tau)
    for i in range(tau.shape[0]):
        flat = tau[i].reshape(-1)
        k = int(round(density * flat.numel()))
        if k <= 0:
            continue
        mag = flat.abs()
        cut = kth_largest(mag, k) if k < flat.numel() else mag.new_tensor(0.0)
        out[i] = torch.where(tau[i].abs() >= cut, tau[i], torch.zeros_like(tau[i]))
    return out


def dare_drop(tau: torch.Tensor, density: float, generator: torch.Generator,
              rescale: bool = True) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``, rescale survivors by ``1/density``."""
    if density >= 1.0:
        return tau.clone()
    keep = torch.rand(tau.shape, generator=generator, dtype=torch.float32) < density
    out = tau * keep.to(tau.dtype)
    return out / density if (rescale and density > 0) else out


def elect_sign(tau: torch.Tensor, method: SignMethod) -> torch.Tensor:
    """The elected sign per entry, ``(...)``, from ``tau (n, ...)``; ties give +1."""
    if method is SignMethod.TOTAL:
        s = tau.sum(dim=0)
    else:
        s = torch.sign(tau).sum(dim=0)
    return torch.where(s >= 0, 1.0, -1.0).to(tau.dtype)


def disjoint_merge(tau: torch.Tensor, sign: torch.Tensor, how: DisjointMerge) -> torch.Tensor:
    """Combine the nonzero entries whose sign agrees with ``sign``: mean over them, or sum."""
    agree = (torch.sign(tau) == sign.unsqueeze(0)) & (tau != 0)  # (n, ...)
    picked = tau * agree.to(tau.dtype)
    total = picked.sum(dim=0)
    if how is DisjointMerge.SUM:
        return total
    count = agree.sum(dim=0).clamp_min(1).to(tau.dtype)
    return total / count
