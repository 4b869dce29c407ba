"""The storage formats an engine can run with, by name (no torch import: the CLI lists them)."""

WEIGHT_FORMATS: tuple[str, ...] = ("bf16", "fp8", "int4", "int8")  # the LM's linear layers
KV_CACHE_FORMATS: tuple[str, ...] = ("bf16", "fp8")  # fp8: half the memory, twice the conversations
