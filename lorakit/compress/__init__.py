"""compress/: resize adapters by rank policies, LoRA-Squeeze and LoRA extraction.

Example:
    >>> from lorakit.compress.resize import resize   # doctest: +SKIP
"""
