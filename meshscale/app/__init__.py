"""What a person runs: the `meshscale` CLI, the demo, the Ray demo, run directories of the
demos, and the report (rich tables, report.json, report.png).

Imports: anything. The only room that imports rich, matplotlib or the example models.
"""
