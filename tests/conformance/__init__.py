"""Conformance tests: PEFT / transformers load what lorakit writes, as real clients."""
