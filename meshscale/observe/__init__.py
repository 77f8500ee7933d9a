"""What a run tells the people watching it: metrics records, writers and goodput.

A room of its own, below the loop (`meshscale.elastic` feeds it) and above nothing but
the mesh vocabulary: the loop hands it plain records and never waits for a write.
"""
