"""Where things live on a mesh: `MeshShape`, which layers each stage holds (schedules), the
one sharding rule for state and batches, stored padding, and shard-by-shard placement.

Imports: `meshscale.errors` only. Every other room asks this one how a leaf is placed.
"""
