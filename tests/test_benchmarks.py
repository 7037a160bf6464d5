"""The step benchmark (`scripts.tools.benchmark_gpu`) on a CPU: every arm timed, the zoo's syncs counted, ours 0."""

from __future__ import annotations

import os
import sys

import pytest
from bundle_helpers import REPO, config
from scripts.tools import benchmark_gpu

pytestmark = pytest.mark.slow  # trains a real network or runs a bundle workflow


def table_rows(out: str) -> dict[str, list[str]]:
    """The arms' rows of the printed table: arm -> its cells."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("arm", "---"):
            rows[cells[0]] = cells[1:]
    return rows


def test_the_step_benchmark_prints_every_arm_and_the_zoo_s_syncs(capsys, monkeypatch):
    configs = str([config("train.json"), os.path.join(REPO, "tests", "data", "tiny.json")])
    argv = ["benchmark_gpu", "--config_file", configs, "--rounds", "2", "--warmup", "1", "--compile", "on"]
    monkeypatch.setattr(sys, "argv", [*argv, "--inference", "off"])
    benchmark_gpu.main()
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert set(rows) == {*benchmark_gpu.ARMS, benchmark_gpu.COMPILED}, out
    assert all(float(cells[0]) > 0 and float(cells[1]) > 0 for cells in rows.values())
    sync_ops = {arm: cells[2] for arm, cells in rows.items()}
    assert int(sync_ops.pop("zoo")) > 20 and set(sync_ops.values()) == {"0"}, sync_ops
    assert "ratio of means" in out and "compiled:" in out and "no GPU" in out
