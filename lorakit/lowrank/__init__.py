"""lowrank/: the linear-algebra engine (exact factored SVD, randomized SVD, rank policies).

Example:
    >>> from lorakit.lowrank import RankPolicy, factored_svd, singular_values
"""

from lorakit.lowrank.device import resolve_device
from lorakit.lowrank.factored import (
    FactoredSVD,
    batched_factored_svd,
    factored_svd,
    module_svd,
    singular_values,
)
from lorakit.lowrank.policy import PolicyKind, RankPolicy, allocate_budget, select_rank
from lorakit.lowrank.randomized import randomized_svd

__all__ = ["FactoredSVD", "PolicyKind", "RankPolicy", "allocate_budget", "batched_factored_svd",
           "factored_svd", "module_svd", "randomized_svd", "resolve_device", "select_rank",
           "singular_values"]
