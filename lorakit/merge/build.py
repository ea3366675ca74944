"""Turn merge results (an SVD or stacked factors) back into LoRA modules.

Example:
    >>> import torch
    >>> from lorakit.adapter import LoraModule
    >>> like = LoraModule(torch.ones(1, 3), torch.ones(2, 1), alpha=1)
    >>> m = module_from_svd(torch.eye(2, 1), torch.tensor([4.0]), torch.eye(1, 3), like)
    >>> m.rank, m.scale, m.delta()[0, 0].item()
    (1, 1.0, 4.0)
"""

from __future__ import annotations

import torch

from lorakit.adapter import LoraModule, ModuleKind


def shape_factors(up: torch.Tensor, down: torch.Tensor, like: LoraModule
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reshape matrix factors ``up (out, k)``, ``down (k, in*kh*kw)`` to ``like``'s layout."""
    k = down.shape[0]
    if like.kind is ModuleKind.CONV:
        return up.reshape(up.shape[0], k, 1, 1), down.reshape(k, *like.down.shape[1:])
    return up, down


def module_from_svd(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, like: LoraModule,
                    dtype: torch.dtype | None = None) -> LoraModule:
    """A scale-1 module (``alpha = k``) whose update is ``u @ diag(s) @ vh``; sqrt(s) per side.

    ``u (out, k)``, ``s (k,)``, ``vh (k, in*kh*kw)``; at least rank 1 is kept (a zero update
    becomes one zero unit) so every output module stays loadable.
    """
    dtype = dtype or like.dtype
    if s.numel() == 0:
        u, s, vh = u.new_zeros(u.shape[0], 1), s.new_zeros(1), vh.new_zeros(1, vh.shape[1])
    root = s.clamp_min(0).sqrt()  # (k,)
    up = (u * root).to(dtype)  # (out, k)
    down = (root[:, None] * vh).to(dtype)  # (k, in*kh*kw)
    up, down = shape_factors(up, down, like)
    return LoraModule(down=down.contiguous(), up=up.contiguous(), alpha=float(down.shape[0]),
                      kind=like.kind)
