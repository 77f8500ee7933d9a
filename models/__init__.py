"""Reshardable Flax NNX models (they depend on meshscale's contract, never the reverse)."""
