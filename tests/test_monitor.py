"""The training monitor: per-iteration CSV and TensorBoard scalars, and MLflow through an attached MLFlowHandler."""

from __future__ import annotations

import csv
import math
import re

import monai
import pytest
import torch
from ignite.engine import Events
from monai.data import Dataset
from monai.data.utils import no_collation
from monai.handlers import MLFlowHandler
from scripts.guard.monitor import TrainingMonitor
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from training_helpers import make_trainer, poison_gradients, tiny_sample

pytestmark = pytest.mark.slow  # trains a real network or runs a bundle workflow


class RecordingMLflow(MLFlowHandler):
    """An `MLFlowHandler` that records what it would send to the MLflow server (mlflow itself is not installed)."""

    def __init__(self) -> None:  # MLFlowHandler.__init__ builds an MLflow client
        self.iteration_log, self.epoch_log, self.iteration_logger, self.epoch_logger = True, False, None, None
        self.output_transform = monai.handlers.from_engine(["loss"], first=True)  # what `--tracking mlflow` sets
        self.tag_name, self.optimizer_param_names, self.close_on_complete = "train_loss", ("lr",), False
        self.cur_run, self.logged = None, []

    def start(self, engine) -> None:
        self.cur_run = "run"

    def complete(self, engine) -> None:
        pass

    def _log_metrics(self, metrics, step=None) -> None:
        self.logged.append((step, metrics))


def run_monitored(tmp_path, epochs=2, poison_iteration=None, mlflow=None, weight_norms=None):
    trainer, guard = make_trainer(tmp_path, epochs, guard_kwargs={"snapshot_every": 2})
    TrainingMonitor(log_dir=str(tmp_path / "tb"), log_every=0, csv_path=str(tmp_path / "log.csv"), guard=guard).attach(
        trainer
    )
    if mlflow is not None:
        mlflow.attach(trainer)
    if weight_norms is not None:  # the norm of the weights each iteration starts from
        params = list(trainer.network.parameters())
        trainer.add_event_handler(
            Events.ITERATION_STARTED, lambda e: weight_norms.append(float(torch.nn.utils.get_total_norm(params)))
        )

    poison_gradients(trainer, [poison_iteration], float("nan"))

    trainer.run()
    return trainer, guard


def test_csv_and_tensorboard_have_every_iteration(tmp_path):
    weight_norms = []
    trainer, guard = run_monitored(tmp_path, epochs=2, poison_iteration=3, weight_norms=weight_norms)
    rows = list(csv.DictReader((tmp_path / "log.csv").open()))
    assert [int(r["iteration"]) for r in rows] == list(range(1, 9))
    assert [r["event"] for r in rows] == ["", "", "grad", "", "", "", "", ""]
    assert int(rows[-1]["skipped_steps"]) == 1 == guard.counters["skipped_steps"]
    assert [float(r["weight_norm"]) for r in rows] == pytest.approx(weight_norms, rel=1e-6)
    assert weight_norms[3] == weight_norms[2] != weight_norms[1]  # the skipped step 3 left the weights alone
    assert all(float(r["lr"]) == 0.002 and float(r["amp_scale"]) == 1.0 for r in rows)
    assert math.isnan(float(rows[0]["update_ratio"])) and float(rows[-1]["update_ratio"]) > 0
    assert float(rows[-1]["grad_norm"]) == trainer.state.output.grad_norm
    assert all(0 < float(r["positive_score"]) < 1 for r in rows if not r["event"])
    tb = EventAccumulator(str(tmp_path / "tb"))
    tb.Reload()
    for tag in ("train/loss", "train/grad_norm", "train/weight_norm", "train/lr", "train/rollbacks", "train/score_gap"):
        assert [e.step for e in tb.Scalars(tag)] == list(range(1, 9)), tag
    assert [e.value for e in tb.Scalars("train/event")] == [0, 0, 1, 0, 0, 0, 0, 0]


def test_the_plot_command_draws_the_monitors_csv(tmp_path, monkeypatch, capsys):
    # `python -m scripts.tools.plot_training eval/train_log.csv out.png`, the README's figure command
    from scripts.tools import plot_training

    run_monitored(tmp_path, epochs=2, poison_iteration=3)
    out = tmp_path / "run.png"
    monkeypatch.setattr("sys.argv", ["plot_training", str(tmp_path / "log.csv"), str(out), "--title", "a run"])
    plot_training.main()
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    (tmp_path / "empty.csv").write_text((tmp_path / "log.csv").read_text().splitlines()[0] + "\n")
    with pytest.raises(ValueError, match="empty.csv has no iterations"):
        plot_training.read_log(str(tmp_path / "empty.csv"))


def test_mlflow_gets_every_scalar_as_floats(tmp_path):
    mlflow = RecordingMLflow()
    run_monitored(tmp_path, epochs=1, mlflow=mlflow)
    # the monitor is the handler's iteration logger: one batch of float metrics per iteration, nothing else
    assert [step for step, _ in mlflow.logged] == [1, 2, 3, 4]
    for _, metrics in mlflow.logged:
        assert {"train_loss", "train_loss_cls", "train_grad_norm", "train_weight_norm", "train_lr"} <= set(metrics)
        assert all(isinstance(v, (float, int)) for v in metrics.values())


def test_run_cost_says_once_how_long_the_run_will_take(caplog):
    import time

    from ignite.engine import Engine
    from scripts.detection.run_cost import RunCostEstimate

    engine = Engine(lambda e, batch: time.sleep(0.01))
    engine.add_event_handler(Events.STARTED, lambda e: setattr(e.state, "device", torch.device("cpu")))
    RunCostEstimate(after=2, hint_hours=1e-6).attach(engine)
    with caplog.at_level("INFO", logger="scripts.detection.run_cost"):
        engine.run(range(5), max_epochs=4)
    lines = [r for r in caplog.records if r.name == "scripts.detection.run_cost"]
    assert "4 epochs x 5 iterations (20 to go)" in lines[0].getMessage()
    estimate = [r for r in lines if "per iteration" in r.getMessage()]
    assert len(estimate) == 1 and estimate[0].levelname == "WARNING"  # once; and on a CPU, the demo command
    assert "configs/demo.json" in estimate[0].getMessage()


def test_the_console_line_of_a_batch_without_nodule_says_so_instead_of_nan(tmp_path, caplog):
    # a crop without a box has no positive anchor to score: its score gap is NaN in the CSV, never "nan" on the console
    empty = {**tiny_sample(0), "box": torch.zeros((0, 6)), "label": torch.zeros(0, dtype=torch.long)}
    loader = torch.utils.data.DataLoader(Dataset([empty, tiny_sample(1)]), batch_size=1, collate_fn=no_collation)
    trainer, guard = make_trainer(tmp_path, epochs=1, loader=loader)
    TrainingMonitor(log_every=1, csv_path=str(tmp_path / "log.csv"), progress=False, guard=guard).attach(trainer)
    with caplog.at_level("INFO", logger="scripts.guard.monitor"):
        trainer.run()
    lines = [r.getMessage() for r in caplog.records if r.name == "scripts.guard.monitor"]
    assert len(lines) == 2 and "nan" not in lines[0].lower(), lines
    assert lines[0].endswith("score gap - (no nodule in the batch) guard events 0 skipped 0 rollbacks 0")
    assert re.search(r"score gap -?[0-9]", lines[1]), lines[1]
    rows = list(csv.DictReader((tmp_path / "log.csv").open()))
    assert math.isnan(float(rows[0]["score_gap"])) and math.isfinite(float(rows[1]["score_gap"]))
