"""compose/: rank-wise units (split, select, assemble) and multi-step recipes.

Example:
    >>> from lorakit.compose.units import split, assemble   # doctest: +SKIP
"""
