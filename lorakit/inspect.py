"""``lorakit inspect``: what an adapter holds, with exact spectra computed from the factors.

For every module: rank, alpha, scale, parameter count, dtype, the singular values of the full
update ``scale * B @ A`` (exact, from the factors, never the dense matrix), the effective rank
(singular values above ``rtol * s_max``: the update's true rank) and the energy (fraction of
``||delta||_F^2``) kept at each rank ``k = 1..r``. A LyCORIS module (LoHa, LoKr, LoCon-Tucker, full
diff) is inspected through its exact LoRA form: ``rank`` is that form's (LoKr ``r1 * r2``, LoHa
``r1 * r2``, a diff ``min(out, in)``), ``effective_rank`` the true rank of the update, and
``lycoris_type`` names the type.

Example:
    >>> import torch
    >>> from lorakit.adapter import Adapter, LoraModule
    >>> a = Adapter(modules={"q": LoraModule(torch.eye(2, 3), torch.eye(4, 2), alpha=2)})
    >>> info = inspect_adapter(a)
    >>> info["modules"][0]["effective_rank"], info["modules"][0]["energy"]
    (2, [0.5, 1.0])
"""

from __future__ import annotations

from typing import Any

import torch

from lorakit.adapter import Adapter

EFFECTIVE_RANK_RTOL = 1e-6


def module_info(key: str, m, sv: torch.Tensor | None) -> dict[str, Any]:
    """Per-module facts as plain JSON-able values (``sv`` are the update's singular values; None
    when spectra were skipped: the spectral fields are then None, never made-up zeros)."""
    if sv is None:
        info = module_info(key, m, torch.zeros(0))
        info.update(norm=None, singular_values=None, effective_rank=None, energy=None)
        return info
    s = sv.to(torch.float64)
    s_max = float(s.max()) if s.numel() else 0.0
    eff = int((s > EFFECTIVE_RANK_RTOL * s_max).sum()) if s_max > 0 else 0
    e = s * s
    total = float(e.sum())
    energy = (torch.cumsum(e, 0) / total).tolist() if total > 0 else [0.0] * int(s.numel())
    return {
        "key": key,
        "kind": m.kind.value,
        "rank": m.rank,
        "alpha": float(m.alpha),
        "scale": m.scale,
        "rslora": m.rslora,
        "dora": m.magnitude is not None,
        # issue 16b: the LyCORIS type the factors are the exact form of, and the DoRA axis
        "lycoris_type": m.origin,
        "dora_axis": m.magnitude_axis.value if m.magnitude is not None else None,
        "shape": list(m.delta_shape),
        "params": m.num_params(),
        "dtype": str(m.dtype).replace("torch.", ""),
        "norm": total ** 0.5,
        "singular_values": s.tolist(),
        "effective_rank": eff,
        "energy": [round(x, 12) for x in energy],
    }


def inspect_adapter(adapter: Adapter, *, spectra: bool = True,
                    family: str | None = None) -> dict[str, Any]:
    """Summary and per-module facts of ``adapter`` as a JSON-able dict, with its model family
    and what it covers per component and block type (``coverage``, ``coverage_line``).

    Example:
        >>> inspect_adapter(load_adapter("dir"))["n_modules"]   # doctest: +SKIP
        24
    """
    from lorakit.lowrank import singular_values

    mods = []
    for key, m in adapter.modules.items():
        sv = singular_values(m) if spectra else None
        mods.append(module_info(key, m, sv))
    ranks = sorted({m.rank for m in adapter.modules.values()})
    from lorakit.formats import adapter_family
    from lorakit.formats.coverage import coverage, coverage_line, ignored, notes
    from lorakit.formats.families import get_family

    fam = get_family(family) if family else adapter_family(adapter)
    cov = coverage(adapter, fam) if fam is not None else None
    return {
        "source": adapter.source,
        "format": adapter.source_format,
        "layout": adapter.layout,
        "base_model": adapter.base_model,
        "n_modules": len(adapter.modules),
        "ranks": ranks,
        "alphas": sorted({float(m.alpha) for m in adapter.modules.values()}),
        "scales": sorted({m.scale for m in adapter.modules.values()}),
        "params": adapter.num_params(),
        "extra_tensors": sorted(adapter.extras),
        "extra_params": sum(t.numel() for t in adapter.extras.values()),
        "dtypes": adapter.dtypes(),
        "rslora": adapter.uses_rslora,
        "dora": adapter.is_dora,
        "components": adapter.components(),
        "family": fam.name if fam else None,
        "coverage": cov,
        "coverage_line": coverage_line(cov) if cov is not None else None,
        "ignored_keys": ignored(adapter),
        "lycoris_types": sorted({m.origin for m in adapter.modules.values() if m.origin}),
        "notes": notes(adapter, fam),
        "modules": mods,
    }
