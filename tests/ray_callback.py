"""The Ray Train callback of tests/test_ray.py, apart from tests/ray_worker.py so that
collecting the suite never imports `ray.train` (several seconds of CPU in every xdist
worker); test_ray imports it when a job starts."""

from __future__ import annotations

import json

from ray.train import UserCallback


class ReportedMetrics(UserCallback):
    """A Ray Train callback (it runs in Ray's controller) that appends process 0's
    `ray.train.report` metrics to a file, for the test to read."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics[0]) + "\n")
