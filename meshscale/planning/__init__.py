"""Choosing a mesh: the candidate space (the rule), memory per device, try-runs, the
decision against the baseline, and pre-compilation of the likely next meshes.

(Named `planning`, not `search`: `meshscale.search` is the public function.)

Imports: `training`, `model`, `layout`, `runtime`.
"""
