"""The default rank and the rank cap, apart from `rank.py` so the CLI can print them without importing torch."""

from __future__ import annotations

DEFAULT_RANK = 32  # a fixed rank: what kohya's scripts and most published LoRAs use
BUDGET_RANK_CAP = 128  # the largest rank a rule or a size budget may give a layer
