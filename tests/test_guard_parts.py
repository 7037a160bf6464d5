"""The guard's parts on their own: snapshot, file blame, learning signal, event log, step record."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from scripts.detection.schedule import WarmupDecayLR
from scripts.detection.step_report import StepReport, read_to_host
from scripts.guard.blame import FileBlame
from scripts.guard.learning_signal import LearningSignal
from scripts.guard.log import GuardEvent, GuardLog
from scripts.guard.lr_search import SearchResult, Trial
from scripts.guard.snapshot import Snapshot
from scripts.guard.window import StepWindow


def trained_pair():
    network = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9)
    scheduler = WarmupDecayLR(optimizer, warmup_iters=2, total_iters=10)
    return network, optimizer, scheduler


def train_steps(network, optimizer, scheduler, n: int) -> None:
    for _ in range(n):
        optimizer.zero_grad()
        network(torch.randn(8, 4)).square().mean().backward()
        optimizer.step()
        scheduler.step()


def test_snapshot_restores_everything_exactly_and_measures_the_drift():
    network, optimizer, scheduler = trained_pair()
    train_steps(network, optimizer, scheduler, 2)
    snapshot = Snapshot(network, optimizer, lr_scheduler=scheduler)
    snapshot.take(2)
    saved = {k: v.clone() for k, v in network.state_dict().items()}
    saved_momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in network.parameters()]
    train_steps(network, optimizer, scheduler, 3)
    moved = Snapshot(network, optimizer).network_state()
    drift = snapshot.drift(moved, steps=3)
    names = [n for n, _ in network.named_parameters()]
    norm = torch.nn.utils.get_total_norm([saved[n] for n in names])
    expected = float(torch.nn.utils.get_total_norm([moved[n] - saved[n] for n in names]) / norm) / 3
    assert drift.update_ratio == pytest.approx(expected, rel=1e-6) and drift.update_ratio > 0
    growth = (float(torch.nn.utils.get_total_norm([moved[n] for n in names])) / float(norm) - 1) / 3
    assert drift.norm_growth == pytest.approx(growth, rel=1e-4) and drift.norm_growth != 0
    snapshot.restore()
    assert all(torch.equal(v, saved[k]) for k, v in network.state_dict().items())  # BatchNorm buffers included
    assert all(
        torch.equal(optimizer.state[p]["momentum_buffer"], m) for p, m in zip(network.parameters(), saved_momentum)
    )
    assert scheduler.last_epoch == 2 and snapshot.iteration == 2


def test_blame_quarantines_bad_input_at_once_and_a_blow_up_never():
    blame = FileBlame(quarantine_after=2)
    for i in range(8):  # an LR blow-up: every file fails alike
        files = [f"/d/case{i % 4}.nii.gz"]
        blame.seen(files)
        assert blame.blame(files, "loss").quarantine == ()
    blame.seen(["/d/nan.nii.gz"])
    assert blame.blame(["/d/nan.nii.gz"], "input").quarantine == ()  # once is not yet twice
    blame.seen(["/d/nan.nii.gz"])
    verdict = blame.blame(["/d/nan.nii.gz"], "input")
    assert verdict.files == ("/d/nan.nii.gz",) and verdict.quarantine[0][0] == "/d/nan.nii.gz"
    restored = FileBlame()
    restored.load_state_dict(json.loads(json.dumps(blame.state_dict())))
    assert restored.stats == blame.stats and restored.events == blame.events


def test_blame_quarantines_a_file_that_fails_far_more_often_than_the_others():
    blame = FileBlame(quarantine_after=2)
    quarantined = []
    for i in range(40):
        good = f"/d/good{i % 5}.nii.gz"
        blame.seen([good])
        if i % 10 == 0:
            blame.blame([good], "grad")  # an occasional event anywhere
        blame.seen(["/d/bad.nii.gz"])
        quarantined += blame.blame(["/d/bad.nii.gz"], "grad").quarantine
    assert [f for f, _ in quarantined][:1] == ["/d/bad.nii.gz"]  # seen 4 times, failed every time


def test_learning_signal_notices_a_collapse_relative_to_the_runs_own_best():
    signal = LearningSignal(span=3, collapse_fraction=0.5, stall_windows=2)
    for gap in (0.01, 0.05, 0.1, 0.2, 0.3, math.nan, 0.3):
        signal.add(gap)
    assert signal.best == pytest.approx((0.2 + 0.3 + 0.3) / 3) and not signal.collapsed()
    for gap in (0.02, 0.01):
        signal.add(gap)
    assert signal.collapsed() and not signal.stalled()
    signal.add(0.0)
    assert signal.stalled()
    signal.rebase()  # a dip a smaller LR did not cure: the current level is the new reference
    assert not signal.collapsed() and signal.best == pytest.approx(0.01)
    signal.restart()
    assert math.isnan(signal.level) and not signal.collapsed()


def test_learning_signal_never_judges_a_run_that_has_not_learned_yet():
    signal = LearningSignal(span=2, stall_windows=1)
    for gap in (-0.01, 0.0, -0.02, 0.0):  # noise around zero: no best above zero, nothing to collapse from
        signal.add(gap)
    assert not signal.collapsed() and not signal.stalled()


def step(loss: float, positive: float = 0.5, negative: float = 0.1) -> StepReport:
    return StepReport(loss, loss, 0.0, 1.0, 1.0, positive_score=positive, negative_score=negative)


def test_step_window_sets_the_spike_limit_and_summarises_each_window():
    window = StepWindow(size=3, max_growth=10.0)
    assert window.spike_limit() == math.inf  # nothing applied yet: no limit
    assert not window.applied(step(0.2))
    assert window.spike_limit() == 10.0  # the median below 1 counts as 1
    window.refused()
    assert not window.applied(step(4.0, positive=math.nan))  # no positive anchor: no score gap
    assert window.applied(step(3.0))
    assert window.spike_limit() == 30.0
    summary = window.close()
    assert not summary.clean and math.isclose(summary.mean_loss, 7.2 / 3) and math.isclose(summary.score_gap, 0.4)
    for loss in (2.0, 2.0, 2.0):
        full = window.applied(step(loss))
    assert full and window.close().clean and window.spike_limit() == 20.0  # the last 3 losses, across windows
    window.applied(step(math.nan))
    window.clear()  # a rollback
    assert window.spike_limit() == math.inf and window.reports == [] and window.clean


def test_guard_log_writes_events_searches_report_and_checkpoint(tmp_path):
    log = GuardLog(str(tmp_path / "report.json"), str(tmp_path / "models" / "last_good.pt"))
    event = GuardEvent(iteration=3, epoch=1, kind="grad", action="step skipped", what="non-finite grad", files=("/a",))
    log.record(event)
    log.record_search(3, SearchResult((Trial(0.1, math.nan, True), Trial(0.01, 0.5, False)), 0.01))
    assert log.write_report({"status": "completed"}) == str(tmp_path / "report.json")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "completed" and report["events"][0]["files"] == ["/a"]
    assert report["lr_searches"][0]["chosen_lr"] == 0.01 and report["lr_searches"][0]["trials"][0]["failed"]
    log.save_checkpoint({"network": {"w": torch.ones(2)}})
    assert torch.equal(torch.load(tmp_path / "models" / "last_good.pt")["network"]["w"], torch.ones(2))
    assert "non-finite grad at epoch 1 iteration 3" in event.line() and event.line().endswith("step skipped; batch: a")
    bad_input = GuardEvent(
        iteration=4, epoch=1, kind="input", action="step skipped", what="non-finite input", files=("/b",)
    )
    assert bad_input.line().endswith("step skipped; files: b")
    silent = GuardLog(None, None)  # another DDP rank: records, writes nothing
    silent.record(event)
    assert silent.write_report({}) is None and silent.save_checkpoint({}) is None


def test_step_report_reads_named_tensors_in_one_copy():
    host = read_to_host({"loss": torch.tensor(1.5), "flags": torch.tensor([True, False]), "norm": torch.ones(1)})
    assert host == {"loss": [1.5], "flags": [1.0, 0.0], "norm": [1.0]}
    report = StepReport(loss=1.0, loss_cls=0.6, loss_reg=0.4, grad_norm=2.0, weight_norm=3.0, positive_score=0.3)
    assert report.stepped and math.isnan(report.score_gap)
    assert dataclasses.replace(report, negative_score=0.1).score_gap == pytest.approx(0.2)
