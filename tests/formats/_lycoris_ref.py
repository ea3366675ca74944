"""LyCORIS updates computed with numpy straight from LyCORIS's published definitions, the reference
for tests/formats/test_lycoris*.py and test_real_next.py (never calls lorakit).

From KohakuBlueleaf/LyCORIS ``lycoris/modules`` and ``lycoris/functional`` (forward pass,
``get_weight``): LoHa ``(w1a @ w1b) * (w2a @ w2b)``, Tucker ``einsum("i j ..., j r, i p -> p r
...", t, w_b, w_a)``; LoKr ``kron(w1, w2)`` with ``w1`` unsqueezed to ``w2``'s rank, ``w2`` from
``rebuild_tucker = einsum("i j ..., i p, j r -> p r ...", t, w2a, w2b)`` or ``w2a @ w2b``; LoCon
Tucker ``rebuild_tucker(mid, up^T, down)``; full ``diff``. Scale ``alpha / dim`` with ``dim``
``hada_w1_b.shape[0]``, ``lora_down.shape[0]`` or, for LoKr, ``lokr_w1_b.shape[0]`` if w1 is
factored else ``lokr_w2_b.shape[0]`` if w2 is, else 1; no alpha: 1. The product is reshaped
(row-major) to the base weight's shape, as ComfyUI and LyCORIS do.
"""

from __future__ import annotations

import numpy as np


def _np(t) -> np.ndarray:
    return t.detach().double().numpy() if hasattr(t, "detach") else np.asarray(t, np.float64)


def _alpha(g: dict, dim: int | None) -> float:
    if "alpha" not in g or dim is None:
        return 1.0
    return float(_np(g["alpha"]).reshape(())) / dim


def _mat(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1)


def loha(g: dict) -> tuple[np.ndarray, float]:
    w1a, w1b, w2a, w2b = (_np(g[k]) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    if "hada_t1" in g:
        m1 = np.einsum("ij...,jr,ip->pr...", _np(g["hada_t1"]), w1b, w1a)
        m2 = np.einsum("ij...,jr,ip->pr...", _np(g["hada_t2"]), w2b, w2a)
    else:
        m1, m2 = _mat(w1a) @ _mat(w1b), _mat(w2a) @ _mat(w2b)
    return m1 * m2, _alpha(g, w1b.shape[0])


def lokr(g: dict) -> tuple[np.ndarray, float]:
    dim = None
    if "lokr_w1" in g:
        w1 = _np(g["lokr_w1"])
    else:
        w1, dim = _np(g["lokr_w1_a"]) @ _np(g["lokr_w1_b"]), g["lokr_w1_b"].shape[0]
    if "lokr_w2" in g:
        w2 = _np(g["lokr_w2"])
    else:
        w2a, w2b = _np(g["lokr_w2_a"]), _np(g["lokr_w2_b"])
        dim = dim if dim is not None else w2b.shape[0]
        if "lokr_t2" in g:
            w2 = np.einsum("ij...,ip,jr->pr...", _np(g["lokr_t2"]), w2a, w2b)
        else:
            w2 = (w2a @ w2b.reshape(w2b.shape[0], -1)).reshape(w2a.shape[0], *w2b.shape[1:])
    while w1.ndim < w2.ndim:
        w1 = w1[..., None]
    return np.kron(w1, w2), _alpha(g, dim)


def locon(g: dict) -> tuple[np.ndarray, float]:
    up, down = _mat(_np(g["lora_up.weight"])), _mat(_np(g["lora_down.weight"]))
    if "lora_mid.weight" in g:
        w = np.einsum("ij...,ip,jr->pr...", _np(g["lora_mid.weight"]), up.T, down)
    else:
        w = up @ down
    return w, _alpha(g, down.shape[0])


def full(g: dict) -> tuple[np.ndarray, float]:
    return _np(g["diff"]), 1.0


def delta(g: dict, shape: tuple[int, ...]) -> np.ndarray:
    """The module's update ``scale * W`` reshaped to ``shape`` (the base weight's), float64."""
    if "hada_w1_a" in g:
        w, s = loha(g)
    elif any(k.startswith("lokr_") for k in g):
        w, s = lokr(g)
    elif "diff" in g:
        w, s = full(g)
    else:
        w, s = locon(g)
    assert w.size == int(np.prod(shape)), (w.shape, shape)
    return s * w.reshape(shape)


def truncated(d: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """The rank-``k`` truncated SVD of ``d`` (as a matrix ``(out, -1)``) and its error."""
    m = d.reshape(d.shape[0], -1)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k], float(np.sqrt((s[k:] ** 2).sum()))
