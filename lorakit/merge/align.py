"""Line several adapters up module by module before a merge.

Heterogeneous inputs are the normal case: different ranks, alphas, rsLoRA, per-module patterns and
target-module sets. The merged module set is the union (a module missing from an adapter
contributes zero) or, with ``intersect``, only the modules every adapter has. Extras (heads,
modules_to_save) follow :class:`ExtrasPolicy`; the default refuses adapters whose extras differ.

Example:
    >>> import torch
    >>> from lorakit.adapter import Adapter, LoraModule
    >>> a = Adapter(modules={"q": LoraModule(torch.ones(1, 2), torch.ones(3, 1), alpha=1)})
    >>> b = Adapter(modules={"v": LoraModule(torch.ones(2, 2), torch.ones(3, 2), alpha=2)})
    >>> [k for k, _ in align([a, b], [1.0, 1.0]).items()]
    ['q', 'v']
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorakit.adapter import Adapter, LoraModule
from lorakit.errors import IncompatibleAdaptersError, OptionError, UnsupportedVariantError


class ExtrasPolicy(str, enum.Enum):
    """What a merge does with non-LoRA tensors (heads, modules_to_save)."""

    ERROR = "error"  # refuse when the adapters' extras differ (the default)
    FIRST = "first"  # keep the first adapter's extras
    DROP = "drop"  # write no extras


@dataclass(frozen=True)
class Term:
    """One adapter's contribution to one module: ``weight * module.scale * B @ A``."""

    index: int  # which input adapter
    weight: float
    module: LoraModule

    @property
    def coeff(self) -> float:
        return self.weight * self.module.scale


def parse_weights(weights: Sequence[float] | str | None, n: int) -> list[float]:
    """Weights per adapter: a list, ``"1,1,-0.5"``, or None for all ones.

    Example:
        >>> parse_weights("1,0.5", 2)
        [1.0, 0.5]
    """
    if weights is None:
        return [1.0] * n
    if isinstance(weights, str):
        try:
            weights = [float(w) for w in weights.split(",") if w.strip()]
        except ValueError as e:
            raise OptionError(f"--weights {weights!r} is not a comma-separated list of numbers",
                              key="weights") from e
    from lorakit.values import check_weight

    out = [check_weight(w, "weights") for w in weights]  # finite, |w| <= 1e6
    if len(out) != n:
        raise OptionError(f"{len(out)} weights for {n} adapters", key="weights")
    return out


def align(adapters: Sequence[Adapter], weights: Sequence[float], *, intersect: bool = False,
          allow_dora: bool = False, method: str = "merge") -> dict[str, list[Term]]:
    """``{module key: [Term, ...]}`` over the union (or intersection) of the adapters' modules.

    Shapes of a module must agree across adapters (same ``out``, ``in`` and kernel); DoRA modules
    are refused by name unless ``allow_dora``.
    """
    if len(adapters) < 1:
        raise OptionError("nothing to merge: no adapters given")
    keys: list[str] = []
    for a in adapters:
        for k in a.modules:
            if k not in keys:
                keys.append(k)
    if intersect:
        keys = [k for k in keys if all(k in a.modules for a in adapters)]
        if not keys:
            raise IncompatibleAdaptersError("the adapters share no module (--intersect)")
    out: dict[str, list[Term]] = {}
    for key in keys:
        terms: list[Term] = []
        for i, (a, w) in enumerate(zip(adapters, weights, strict=True)):
            m = a.modules.get(key)
            if m is None:
                continue
            if m.magnitude is not None and not allow_dora:
                raise UnsupportedVariantError(
                    f"DoRA module: the {method} method cannot honour its magnitude vector",
                    path=a.source, key=key, hint="merge the DoRA adapter into its base instead")
            if terms and _shape(terms[0].module) != _shape(m):
                raise IncompatibleAdaptersError(
                    f"update shape {_shape(m)} differs from {_shape(terms[0].module)} in "
                    f"{adapters[terms[0].index].source or 'adapter 0'}", path=a.source, key=key,
                    hint="are these adapters for the same base model?")
            terms.append(Term(i, w, m))
        out[key] = terms
    return out


def _shape(m: LoraModule) -> tuple[int, ...]:
    return (m.kind.value, *m.delta_shape)  # type: ignore[return-value]


def merge_extras(adapters: Sequence[Adapter], policy: ExtrasPolicy) -> dict[str, torch.Tensor]:
    """The extras of the merged adapter under ``policy``."""
    if policy is ExtrasPolicy.DROP:
        return {}
    first = adapters[0].extras
    if policy is ExtrasPolicy.FIRST:
        return dict(first)
    for a in adapters[1:]:
        if set(a.extras) != set(first) or any(not torch.equal(a.extras[k], first[k])
                                              for k in first):
            diff = sorted(set(a.extras) ^ set(first)) or [
                k for k in first if not torch.equal(a.extras[k], first[k])]
            raise IncompatibleAdaptersError(
                "the adapters' extra tensors (heads, modules_to_save) differ", path=a.source,
                key=diff[0] if diff else None,
                hint="choose --extras first or --extras drop")
    return dict(first)


class Space(str, enum.Enum):
    """Where an entry-wise rule sees the tasks (``--space``).

    ``full``: the entries of each full update ``D_t (out, in)``. ``knots``: the coefficients
    ``V_t (p, in)`` of the tasks in the joint SVD basis of ``[D_1 .. D_T]`` (KnOTS,
    :func:`lorakit.merge.knots.aligned_blocks`). ``core``: the cores ``M_t (R_B, R_A)`` in the
    SVD bases of the stacked factors (Core Space, :func:`core_space`). Both are exact
    projections: ``D_t`` is recovered from them, so a linear rule gives ``linear``.
    """

    FULL = "full"
    KNOTS = "knots"
    CORE = "core"


@dataclass(frozen=True)
class CoreSpace:
    """One module's tasks in Core Space: ``D_t = B ib M_t ia^T A`` for the stacked factors
    ``B = [B_1 .. B_T]`` ``(out, R)`` and ``A = [A_1; ..; A_T]`` ``(R, in)``.

    ``B ib`` ``(out, R_B)`` and ``ia^T A`` ``(R_A, in)`` have orthonormal columns / rows (the
    left and right singular vectors of ``B`` and ``A``, never formed); ``cores (n, R_B, R_A)``
    holds each task's ``M_t`` (zeros for a task without the module). Only these small matrices
    are kept: the tall factors are re-read from ``terms`` for the back-projection.
    """

    terms: Sequence[Term]
    ib: torch.Tensor  # (R, R_B): U_B = b @ ib
    ia: torch.Tensor  # (R, R_A): V_A = a^T @ ia
    cores: torch.Tensor  # (n, R_B, R_A) float64
    device: torch.device

    def svd(self, merged: torch.Tensor):
        """The small SVD ``(u, s, vh)`` of a merged core ``(R_B, R_A)`` (float64)."""
        return torch.linalg.svd(merged.double(), full_matrices=False)

    def back_project(self, small, rank: int | None = None):
        """``U (out, k)``, ``S (k,)``, ``Vh (k, in)`` of ``U_B merged V_A^T`` for the top ``k``
        of the small SVD (``rank``; default all): two skinny products with the stacked factors,
        in float32 (float64 when an input is float64)."""
        u, s, vh = small
        k = s.numel() if rank is None else max(0, min(rank, s.numel()))
        work = torch.float64 if any(t.module.dtype == torch.float64 for t in self.terms) \
            else torch.float32
        b, a = _stacked(self.terms, work, self.device)  # (out, R), (R, in)
        left = (self.ib @ u[:, :k]).to(work)  # (R, k)
        right = (vh[:k] @ self.ia.T).to(work)  # (k, R)
        return b @ left, s[:k], right @ a

    def factors(self, merged: torch.Tensor, rank: int | None = None):
        """:meth:`svd` then :meth:`back_project`."""
        return self.back_project(self.svd(merged), rank)


def _stacked(terms: Sequence[Term], dtype: torch.dtype, device: torch.device):
    """``[B_1 .. B_T]`` ``(out, R)`` and ``[A_1; ..; A_T]`` ``(R, in)`` in ``dtype`` on ``device``:
    joined in the factors' own dtype when they share one, then converted once (half the time of
    converting each factor first, for float16 factors)."""
    ups = [t.module.up_matrix() for t in terms]
    downs = [t.module.down_matrix() for t in terms]
    if len({x.dtype for x in ups + downs}) > 1:
        ups, downs = [x.to(dtype) for x in ups], [x.to(dtype) for x in downs]
    b = torch.cat(ups, dim=1).to(device=device, dtype=dtype)  # (out, R)
    a = torch.cat(downs, dim=0).to(device=device, dtype=dtype)  # (R, in)
    return b, a


# Gram eigenvalues kept, relative to the largest, by the Gram's dtype: above its noise floor
# (float64 ~1e-16; float32 ~1e-7, i.e. singular values below 1e-3 of the largest, already below
# the precision of float16 / bfloat16 factors, are dropped)
CORE_RTOL = {torch.float64: 1e-13, torch.float32: 1e-6}


def _basis_maps(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``gram = X^T X`` ``(R, R)``: ``inv (R, p)`` with ``X @ inv`` the left singular vectors
    of ``X`` (descending) and ``root (p, R)`` with ``X = (X @ inv) @ root``; null directions
    (eigenvalues below ``CORE_RTOL`` of the largest, for the Gram's dtype) dropped; the
    decomposition itself runs in float64."""
    rtol = CORE_RTOL.get(gram.dtype, 1e-6)
    lam, vec = torch.linalg.eigh(gram.double())  # ascending
    lam, vec = lam.flip(0), vec.flip(1)
    top = float(lam[0]) if lam.numel() else 0.0
    keep = lam > top * rtol if top > 0 else torch.zeros_like(lam, dtype=torch.bool)
    if not bool(keep.any()):
        keep[:1] = True
        lam = lam.clone()
        lam[:1] = 1.0
    sq = lam[keep].sqrt()  # (p,)
    v = vec[:, keep]  # (R, p)
    return v / sq, (v * sq).T


def core_space(terms: Sequence[Term], n_tasks: int, device: torch.device | None = None
               ) -> CoreSpace:
    """Project one module's tasks ``w_t s_t B_t A_t`` exactly onto Core Space (see
    :class:`CoreSpace`): two ``R x R`` Gram matrices of the stacked factors and their
    eigendecompositions, ``O((out + in) R^2)``, never a dense update. As in the engine, the tall
    Gram products and the back-projection run in float32 (float64 when an input is float64) and
    the small decompositions in float64.

    Example:
        >>> import torch
        >>> from lorakit.adapter import LoraModule
        >>> m = LoraModule(torch.randn(2, 5, dtype=torch.float64),
        ...                torch.randn(4, 2, dtype=torch.float64), alpha=2)
        >>> cs = core_space([Term(0, 1.0, m)], 1)
        >>> u, s, vh = cs.factors(cs.cores[0])
        >>> torch.allclose((u * s) @ vh, m.delta(torch.float64))
        True
    """
    from lorakit.lowrank.factored import gram_products

    dev = device or torch.device("cpu")
    work = torch.float64 if any(t.module.dtype == torch.float64 for t in terms) else torch.float32
    b, a = _stacked(terms, work, dev)  # (out, R), (R, in)
    gb, ga = gram_products(b[None], a[None])  # (1, R, R) each
    del b, a
    ib, rb = _basis_maps(gb[0])  # U_B = b ib, U_B^T b = rb (R_B, R)
    ia, ra = _basis_maps(ga[0])  # V_A = a^T ia, a V_A = ra^T (R, R_A)
    cores = torch.zeros(n_tasks, rb.shape[0], ra.shape[0], dtype=torch.float64, device=dev)
    col = 0
    for t in terms:
        r = t.module.rank
        cores[t.index] += t.coeff * (rb[:, col:col + r] @ ra[:, col:col + r].T)  # (R_B, R_A)
        col += r
    return CoreSpace(list(terms), ib, ia, cores, dev)
