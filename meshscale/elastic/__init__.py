"""The elastic loop: `ElasticTrainer` (built on a `Trainer`), step timing and the step log,
where the device count comes from (resources), and signals that ask for a save.

Imports: every room below it (`planning`, `store`, `training`, `model`, `layout`,
`runtime`); never `app` (no terminal printing, plotting or example models here).
"""
