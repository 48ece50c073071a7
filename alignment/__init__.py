"""Preference alignment on DeepSpeed ZeRO: SFT, reward models, DPO and PPO from YAML recipes."""

from alignment import builtin  # noqa: F401  (registers the built-in models and data with the core)
