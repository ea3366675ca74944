"""``lego``: LoRA-LEGO rank-wise clustering of the adapters' rank-one units.

Per module: split every adapter into rank-one units (``compose/units.py``, ``weight * scale``
folded in symmetrically), canonicalise each (balanced ``|a| = |b|``, sign fixed, since
``(a, b)``, ``(-a, -b)`` and ``(t a, b / t)`` are one unit), pool them and cluster the vectors
``[a; b]`` into ``k`` clusters with scikit-learn's seeded k-means. Each centroid ``(a_c, b_c)`` is
one unit of the merged rank-``k`` module; the dual reweighting of :class:`LegoOptions` then sets
its scale. With ``k`` >= the number of units every unit is its own centroid and the result equals
``cat`` exactly.

Reference: Zhao et al., "Merging LoRAs like Playing LEGO: Pushing the Modularity of LoRA to
Extremes Through Rank-Wise Clustering", ICLR 2025.

Defaults from ``bench/quality.py`` on the six zoo adapters (SmolLM2-135M; mean normalised score,
0 = base model, 1 = each task's own adapter): ``k=16`` (the largest input rank) with
``param_reweight`` 0.21, without it 0.14; adding ``output_reweight=sqrt_ratio`` -1.04,
``cluster_size`` (no param reweighting) -1.62; ``k=32`` -0.21 (and 30x slower k-means). So
``param_reweight`` is on and ``output_reweight`` off by default (``bench/results/quality.md``).

Example:
    >>> lorakit.merge([a, b, c], "lego", k=16)   # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from lorakit.adapter import LoraModule
from lorakit.compose.units import Unit, canonical, unit_module
from lorakit.merge.align import Term
from lorakit.merge.options import LegoOptions, MergeContext, OutputReweight


def _units(terms: list[Term]) -> list[Unit]:
    out = []
    for t in terms:
        m = t.module
        c = t.coeff
        root = math.sqrt(abs(c))
        a = m.down_matrix(torch.float64) * root  # (r, in*k)
        b = m.up_matrix(torch.float64) * math.copysign(root, c)  # (out, r)
        shape = tuple(m.down.shape[1:])
        out += [canonical(Unit("", t.index, j, a[j], b[:, j], m.kind, shape))
                for j in range(m.rank)]
    return out


def _cluster(units: list[Unit], k: int, options: LegoOptions, seed: int) -> list[list[int]]:
    """Member indices of each of ``k`` clusters (seeded k-means on ``[a; b]``)."""
    from sklearn.cluster import KMeans

    x = np.stack([torch.cat([u.a, u.b]).numpy() for u in units])  # (N, in*k + out)
    km = KMeans(n_clusters=k, n_init=options.n_init, max_iter=options.max_iter,
                random_state=seed, algorithm="lloyd")
    labels = km.fit_predict(x)
    return [list(np.flatnonzero(labels == c)) for c in range(k) if np.any(labels == c)]


def _centroid(members: list[Unit], options: LegoOptions, n_total: int, k: int) -> Unit:
    a = torch.stack([u.a for u in members]).mean(0)  # (in*k,)
    b = torch.stack([u.b for u in members]).mean(0)  # (out,)
    factor = 1.0
    if options.param_reweight:
        have = float(a.norm() * b.norm())
        want = sum(u.norm for u in members) / len(members)
        factor *= want / have if have > 0 else 0.0
    if options.output_reweight is OutputReweight.CLUSTER_SIZE:
        factor *= len(members)
    elif options.output_reweight is OutputReweight.SQRT_RATIO:
        factor *= math.sqrt(n_total / k)
    root = math.sqrt(factor)
    return replace(members[0], a=a * root, b=b * root)


def lego_module(terms: list[Term], options: LegoOptions, seed: int, dtype: torch.dtype
                ) -> LoraModule:
    """The LoRA-LEGO merge of one module's terms."""
    units = [u for u in _units(terms) if u.norm > 0] or _units(terms)[:1]
    k = options.k or max(t.module.rank for t in terms)
    if k >= len(units):
        return unit_module(units, dtype)  # every unit is its own cluster: exactly cat
    clusters = _cluster(units, k, options, seed)
    cents = [_centroid([units[i] for i in idx], options, len(units), len(clusters))
             for idx in clusters]
    return unit_module(cents, dtype)


def merge_lego(aligned: dict[str, list[Term]], options: LegoOptions, ctx: MergeContext
               ) -> dict[str, LoraModule]:
    """LoRA-LEGO over every module (see the module docstring)."""
    out = {}
    for key, terms in aligned.items():
        ctx.tick(key)
        out[key] = lego_module(terms, options, ctx.seed, ctx.out_dtype(terms))
    return out
