"""``regmean``: RegMean, the closed-form merge of each linear layer on calibration activations.

Per layer, with ``X_i`` the layer's inputs on adapter ``i``'s prompts and ``G_i = X_i^T X_i``
``(in, in)``, RegMean solves ``min_D sum_i w_i ||X_i D^T - X_i D_i^T||^2``:

    D = (sum_i w_i D_i G_i) M^-1,   M = sum_i w_i G_i

(weighted least squares: ``--weights`` are each task's weight in the regression, so with equal
Grams ``D`` is the weighted mean ``sum_i w_i D_i / sum_i w_i``; weights must be >= 0 and a zero
weight leaves the task out). Before the sums each Gram's off-diagonal entries are shrunk,
``G <- a G + (1 - a) diag(G)`` (``shrink = a``; ``a = 0`` gives the per-feature diagonal
solution ``D[:, k] = sum_i w_i g_ik D_i[:, k] / sum_i w_i g_ik``).

For LoRA, ``D_i = s_i B_i A_i``, so ``D = sum_i B_i (w_i s_i A_i G_i M^-1)``: the merged update is
the concatenation ``[B_1 .. B_T] [A'_1; ..; A'_T]`` of rank ``sum r_i`` with new down factors
``A'_i = w_i s_i A_i G_i M^-1`` ``(r_i, in)``, and ``D`` is never formed. The engine then keeps the
sum's numerical rank or truncates it exactly to the rank policy (Eckart-Young).

``M^-1`` is applied by a Cholesky solve in float64. If ``M`` is singular (a feature no prompt
activates, or fewer tokens than features), a ridge ``1e-8 * mean(diag M)`` is added (times 100
until the factorisation succeeds, at most five times); with a non-singular ``M`` nothing is added.

Modules only some adapters have follow :class:`~lorakit.merge.options.MissingModule` (default
``zero``: the others contribute ``D_j = 0`` with their Gram).

Reference: Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models"
(RegMean), ICLR 2023.

Defaults from ``bench/quality.py`` on the six zoo adapters (SmolLM2-135M, 64 train prompts per
task, rank 16 output; mean normalised score, 0 = base model, 1 = each task's own adapter;
``bench/results/quality.md``): shrink 1.0: 0.81, 0.9: 0.78, 0.5: 0.72, 0.1: 0.65 (0.95: 0.79 in
an earlier sweep), so ``shrink=1`` (plain RegMean; the issue's prototype preferred 0.5 on other
adapters); ``activations=own`` 0.70, below the base model's activations; ``gram_scale=mean``
0.74 (helps nothing here: add and reverse equal, the language-modelling tasks lose);
``missing=skip`` 0.67 (add's MLP update, kept whole, costs the other tasks); the full-rank
output 0.80 against 0.81 at rank 16: the truncation costs nothing.

Example:
    >>> lorakit.merge([a, b], "regmean", model="smollm2_dir",
    ...               calibration=[["347 + 58 ="], ["Capital of France:"]])   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import replace

import torch

from lorakit.adapter import LoraModule
from lorakit.errors import OptionError
from lorakit.merge.align import Term
from lorakit.merge.options import GramScale, MergeContext, MissingModule, RegmeanOptions

RIDGE = 1e-8
RIDGE_STEPS = 5


def shrink_gram(g: torch.Tensor, a: float) -> torch.Tensor:
    """``a G + (1 - a) diag(G)``: off-diagonal entries times ``a``.

    Example:
        >>> shrink_gram(torch.ones(2, 2), 0.5).tolist()
        [[1.0, 0.5], [0.5, 1.0]]
    """
    if a >= 1.0:
        return g
    out = g * a
    out.diagonal().copy_(g.diagonal())
    return out


def cholesky_ridge(m: torch.Tensor, key: str) -> torch.Tensor:
    """The lower Cholesky factor of ``m`` (float64), with the documented ridge if it is
    singular."""
    low, info = torch.linalg.cholesky_ex(m)
    if int(info) == 0:
        return low
    scale = float(m.diagonal().mean()) if float(m.diagonal().mean()) > 0 else 1.0
    eye = torch.eye(m.shape[0], dtype=m.dtype)
    ridge = RIDGE * scale
    for _ in range(RIDGE_STEPS):
        low, info = torch.linalg.cholesky_ex(m + ridge * eye)
        if int(info) == 0:
            return low
        ridge *= 100
    raise OptionError("the Gram sum is not positive semi-definite (non-finite activations?)",
                      key=key)


def check_weights(weights: list[float]) -> None:
    bad = [w for w in weights if w < 0]
    if bad:
        raise OptionError(f"regmean weights are regression weights and must be >= 0, got {bad[0]}",
                          key="weights", hint="a negative task weight has no least-squares "
                          "meaning; use linear for task negation")
    if not any(w > 0 for w in weights):
        raise OptionError("every regmean weight is 0", key="weights")


def _gram(ctx: MergeContext, j: int, key: str, options: RegmeanOptions) -> torch.Tensor:
    gs = ctx.grams[j]
    g = gs.get(key)
    if g is None:
        raise OptionError(f"no Gram for adapter {j} at this module", key=key)
    g = g.to(torch.float64)
    if options.gram_scale is GramScale.MEAN:
        g = g / max(1, gs.tokens)
    return shrink_gram(g, float(options.shrink))


def regmean_module(key: str, terms: list[Term], options: RegmeanOptions, ctx: MergeContext
                   ) -> list[Term]:
    """The terms ``(B_i, A'_i)`` of one module's RegMean update (scale 1, weight 1)."""
    weights = list(ctx.weights)
    present = {t.index: t for t in terms}
    who = range(len(weights)) if options.missing is MissingModule.ZERO else sorted(present)
    who = [j for j in who if weights[j] > 0]
    if not any(j in present for j in who):
        return []
    m = None
    projected: dict[int, torch.Tensor] = {}
    for j in who:  # one Gram resident at a time besides the running sum
        g = _gram(ctx, j, key, options)  # (in, in)
        m = weights[j] * g if m is None else m.add_(g, alpha=weights[j])
        if j in present:
            projected[j] = present[j].module.down_matrix(torch.float64) @ g  # (r_j, in)
        del g
    low = cholesky_ridge(m, key)  # (in, in)
    out = []
    for j, ag in projected.items():
        t = present[j]
        down = torch.cholesky_solve(ag.T.contiguous(), low).T * t.coeff  # (r_j, in): c A G M^-1
        up = t.module.up_matrix(torch.float64)  # (out, r_j)
        out.append(Term(j, 1.0, LoraModule(down=down.contiguous(), up=up.contiguous(),
                                           alpha=float(t.module.rank))))
    return out


def merge_regmean(aligned: dict[str, list[Term]], options: RegmeanOptions, ctx: MergeContext
                  ) -> dict[str, LoraModule]:
    """RegMean over every module, then the engine's exact truncation (module docstring)."""
    from lorakit.merge.exact import truncate

    check_weights(list(ctx.weights))
    first = next(iter(aligned.values()))[0].module
    solved: dict[str, list[Term]] = {}
    for key, terms in aligned.items():
        ctx.tick(key)
        got = regmean_module(key, terms, options, ctx)
        solved[key] = got or [Term(terms[0].index, 0.0, terms[0].module)]
    sub = replace(ctx, dtype=ctx.dtype or first.dtype)
    return truncate(solved, ctx.policy, sub)
