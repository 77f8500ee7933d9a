"""`Trainer` and `TrainState`: the compiled train step for one mesh, its shardings, and the
cache of compiled executables.

Imports: `model`, `layout`, `runtime`.
"""
