"""What reaches disk: Orbax checkpoints restored onto any mesh, the plain-dict state tree,
checksums, background-write failures, and the one-writer lock of a run directory.

Imports: `training`, `layout`, `runtime`.
"""
