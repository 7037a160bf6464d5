"""
Helpers of the tests that train the tiny RetinaNet detector: the detector, tiny in-memory detection samples and their
loader, a guarded trainer of them, exact state comparisons and injected gradient faults.
"""

from __future__ import annotations

import copy

import torch
from bundle_helpers import TINY, parse
from ignite.engine import Events
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.data import Dataset, MetaTensor
from monai.data.utils import no_collation
from monai.engines.utils import IterationEvents
from scripts.data.quarantine import Quarantine, QuarantineSampler
from scripts.detection.schedule import WarmupDecayLR
from scripts.detection.trainer import StabilisedDetectionTrainer
from scripts.guard.stability_guard import StabilityGuard

__all__ = [
    "assert_same_state",
    "finite_weights",
    "make_trainer",
    "poison_gradients",
    "state_of",
    "tiny_detector",
    "tiny_loader",
    "tiny_sample",
]


def tiny_detector() -> RetinaNetDetector:
    """train.json's detector (anchors, matcher, sampler, box selector) on the tiny network of tests/data/tiny.json."""
    parser = parse("train.json", **TINY)
    detector = parser.get_parsed_content("detector")
    parser.get_parsed_content("detector_ops")
    return detector


def tiny_sample(index: int, shape=(32, 32, 16), seed: int = 0) -> dict:
    """A [0, 1] volume with one bright box; its image carries a file name like a loaded NIfTI."""
    g = torch.Generator().manual_seed(seed * 1000 + index)
    image = 0.1 * torch.rand((1, *shape), generator=g)
    x, y = (int(v) for v in torch.randint(4, shape[0] - 14, (2,), generator=g))
    z = int(torch.randint(2, shape[2] - 8, (1,), generator=g))
    image[:, x : x + 8, y : y + 8, z : z + 5] += 0.8
    meta = {"filename_or_obj": f"/data/case_{index:02d}.nii.gz"}
    return {
        "image": MetaTensor(image, meta=meta),
        "box": torch.tensor([[x, y, z, x + 8, y + 8, z + 5]], dtype=torch.float32),
        "label": torch.tensor([0]),
    }


def tiny_loader(num: int = 4, quarantine: Quarantine | None = None, seed: int = 0, shuffle: bool = False):
    """A loader over ``num`` tiny samples, one image per batch, through the bundle's quarantine sampler."""
    dataset = Dataset([tiny_sample(i, seed=seed) for i in range(num)])
    sampler = QuarantineSampler(dataset, quarantine if quarantine is not None else Quarantine(), shuffle=shuffle)
    return torch.utils.data.DataLoader(dataset, batch_size=1, sampler=sampler, collate_fn=no_collation)


def make_trainer(
    tmp_path,
    epochs=2,
    lr=0.002,
    loader=None,
    quarantine=None,
    guard_kwargs=None,
    enabled=True,
    device="cpu",
    handlers=(),
    amp=False,
    warmup_iters=0,
    fp16_on_cpu=False,
    adamw=False,
    **kw,
):
    """
    A guarded `StabilisedDetectionTrainer` of the tiny detector (SGD-Nesterov, constant LR after ``warmup_iters``) on
    ``device``, with a GradScaler under fp16 AMP on CUDA. The default LR is one the guard's LR check confirms for the
    tiny network (its paired trials find 0.01 too high for it). ``fp16_on_cpu`` (with ``amp``) trains a CPU in fp16
    autocast with a CPU GradScaler, which the bundle never does: CUDA's fp16 AMP path (loss scaling, unscaling,
    overflow steps skipped, the scale backed off) run by CI on CPU kernels. ``adamw``: AdamW instead of SGD.
    """
    detector = tiny_detector()
    detector.network.to(device)
    params = detector.network.parameters()
    optimizer = (
        torch.optim.AdamW(params, lr=lr) if adamw else torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
    )
    scheduler = WarmupDecayLR(optimizer, warmup_iters=warmup_iters, total_iters=100, decay="step", step_iters=1000)
    on_cuda = torch.device(device).type == "cuda"
    fp16 = amp and (on_cuda or fp16_on_cpu) and kw.get("amp_dtype") in (None, "float16")  # as train.json
    scaler = torch.amp.GradScaler(torch.device(device).type) if fp16 else None
    quarantine = quarantine if quarantine is not None else Quarantine(str(tmp_path / "quarantine.json"))
    guard = StabilityGuard(
        detector.network,
        optimizer,
        scheduler,
        scaler=scaler,
        enabled=enabled,
        quarantine=quarantine,
        report_path=str(tmp_path / "guard_report.json"),
        ckpt_path=str(tmp_path / "last_good.pt"),
        **{"search_iters": 8, **(guard_kwargs or {})},
    )
    trainer = StabilisedDetectionTrainer(
        device,
        epochs,
        loader if loader is not None else tiny_loader(4, quarantine),
        detector,
        optimizer,
        skip_nonfinite=enabled,
        grad_clip_norm=10.0 if enabled else None,
        train_handlers=[guard, *handlers],
        amp=amp,
        scaler=scaler,
        **kw,
    )
    if fp16_on_cpu:
        trainer.autocast_type = torch.float16
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: scheduler.step())
    return trainer, guard


def state_of(trainer):
    """An exact copy of everything a refused step must leave alone."""
    return {
        "network": copy.deepcopy(trainer.network.state_dict()),
        "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
    }


def assert_same_state(a, b):
    """Network and optimiser states (from `state_of`) bitwise equal."""
    for k, v in a["network"].items():
        assert torch.equal(v, b["network"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k, v in sa[i].items():
            assert torch.equal(v, sb[i][k]) if isinstance(v, torch.Tensor) else v == sb[i][k]
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]


def finite_weights(network):
    """Whether every floating-point parameter and buffer is finite."""
    return all(torch.isfinite(p).all() for p in network.state_dict().values() if p.is_floating_point())


def poison_gradients(trainer, iterations, value: float = float("inf"), every_parameter: bool = False) -> None:
    """After backward at each of ``iterations``, fill the first parameter's gradient (or all) with ``value``."""

    @trainer.on(IterationEvents.BACKWARD_COMPLETED)
    def _poison(engine):
        if engine.state.iteration in iterations:
            grads = [p.grad for p in engine.network.parameters() if p.grad is not None]
            for g in grads if every_parameter else grads[:1]:
                g.fill_(value)
