"""kbit: turn checkpoints into k-bit ones (k = 2..8), run them, finetune them, decode them, measure them."""

__version__ = "0.1.0"
