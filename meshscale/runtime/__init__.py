"""Processes and places: `jax.distributed` start-up and what processes agree on, the local
launcher, and run-directory paths (local or `gs://`).

Imports: nothing of meshscale but `meshscale.errors`.
"""
