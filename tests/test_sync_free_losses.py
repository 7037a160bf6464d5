"""The sync-free RetinaNet losses against MONAI's: matching, box targets, sampling, losses, and no host syncs."""

from __future__ import annotations

import math
import random

import pytest
import torch
from ignite.engine import Events
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.apps.detection.utils.ATSS_matcher import ATSSMatcher
from monai.apps.detection.utils.box_coder import BoxCoder
from monai.apps.detection.utils.hard_negative_sampler import HardNegativeSampler
from scripts.detection.detector import ANCHOR_SCORES
from scripts.detection.sync_free_heads import SyncFreeClassificationHead, SyncFreeRegressionHead
from scripts.detection.sync_free_losses import SyncFreeRetinaNetLoss, sample_anchors, sample_counts
from scripts.detection.targets import atss_match, encode_boxes, pad_targets
from scripts.tools.sync_count import SyncCounter
from training_helpers import (
    assert_same_state,
    finite_weights,
    make_trainer,
    state_of,
    tiny_detector,
    tiny_loader,
    tiny_sample,
)

CPU = torch.device("cpu")
# train.json's anchors and backbone strides (conv1 (2, 2, 1) and a max pool, then x2 per level)
ANCHORS = AnchorGeneratorWithAnchorShape(
    feature_map_scales=[1, 2, 4], base_anchor_shapes=[[6, 8, 4], [8, 6, 5], [10, 10, 6]]
)
STRIDE = (4, 4, 2)


def random_case(rng: random.Random, max_boxes: int = 5):
    """Anchors of a random image size, and per image 0 to ``max_boxes`` boxes: tiny, large, over the border, twins."""
    size = [rng.choice([32, 48, 64]), rng.choice([32, 64]), rng.choice([16, 32])]
    batch = rng.choice([2, 3])
    maps = [torch.zeros(batch, 1, *[s // st // 2**level for s, st in zip(size, STRIDE)]) for level in range(3)]
    anchors = ANCHORS(torch.zeros(batch, 1, *size), maps)
    locations = [m.shape[2:].numel() for m in maps]
    boxes, labels = [], []
    for _ in range(batch):
        rows = []
        for _ in range(rng.randint(0, max_boxes)):
            at_border = rng.random() < 0.3
            lo = [0.0 if at_border and rng.random() < 0.5 else rng.uniform(-2, s - 1) for s in size]
            outside = rng.random() < 0.05
            if outside:
                lo[0] = size[0] + 40.0  # outside the image: every candidate IoU is 0, the threshold is 0
            extent = [rng.choice([0.3, 1, 3, 6, 12, 40]) * rng.uniform(0.5, 1.5) for _ in size]
            hi = [a + e if at_border or outside else min(a + e, s) for a, e, s in zip(lo, extent, size)]
            rows.append(lo + hi)
        if rows and rng.random() < 0.3:
            rows.append(list(rows[0]))  # two identical boxes: ties between boxes
        boxes.append(torch.tensor(rows, dtype=torch.float32).reshape(-1, 6))
        labels.append(torch.tensor([rng.randint(0, 1) for _ in rows], dtype=torch.long))
    return anchors, locations, boxes, labels


def monai_matches(matcher: ATSSMatcher, anchors, locations, boxes) -> list[torch.Tensor]:
    """MONAI's compute_anchor_matched_idxs for an ATSS matcher."""
    out = []
    for a, b in zip(anchors, boxes):
        out.append(torch.full((a.shape[0],), -1) if b.numel() == 0 else matcher(b, a, locations, 3)[1])
    return out


@pytest.mark.parametrize("center_in_gt, batched", [(False, False), (False, True), (True, False), (True, True)])
def test_matching_and_box_targets_equal_monai(center_in_gt, batched):
    rng = random.Random(1234 + center_in_gt)
    matcher = ATSSMatcher(4, center_in_gt=center_in_gt)
    coder = BoxCoder(weights=(1.0,) * 6)
    matched_anchors = 0
    for _ in range(50 if not center_in_gt else 15):
        anchors, locations, boxes, labels = random_case(rng)
        gt, _, valid = pad_targets(boxes, labels, CPU)
        counts = None if batched else [b.shape[0] for b in boxes]
        mine = atss_match(gt, valid, torch.stack(anchors), locations, 3, 4, center_in_gt, num_boxes=counts)
        for i, ref in enumerate(monai_matches(matcher, anchors, locations, boxes)):
            assert torch.equal(mine[i], ref), (i, (mine[i] != ref).sum())
            fg = ref >= 0
            if fg.any():
                expected = coder.encode_single(boxes[i][ref[fg]], anchors[i][fg])
                matched_boxes = gt[i].gather(0, mine[i].clamp(min=0)[:, None].expand(-1, 6))
                torch.testing.assert_close(encode_boxes(matched_boxes, anchors[i], (1.0,) * 6)[fg], expected)
                matched_anchors += int(fg.sum())
    assert matched_anchors > 100  # the cases do match anchors


@pytest.mark.parametrize("batched", [False, True])
def test_one_candidate_per_box_matches_monais_corner_case(batched):
    # one level of one location: one candidate per box, MONAI's "n_candidates <= 1" branch (all matched to box 0)
    anchors = [torch.tensor([[0.0, 0, 0, 8, 8, 4], [1, 1, 0, 7, 7, 4], [0, 0, 1, 8, 8, 3]])] * 2
    boxes = [torch.tensor([[1.0, 1, 1, 5, 5, 3], [2, 2, 1, 8, 8, 4]]), torch.zeros((0, 6))]
    labels = [torch.tensor([0, 1]), torch.zeros(0, dtype=torch.long)]
    gt, _, valid = pad_targets(boxes, labels, CPU)
    counts = None if batched else [2, 0]
    mine = atss_match(gt, valid, torch.stack(anchors), [1], 3, 4, num_boxes=counts)
    ref = monai_matches(ATSSMatcher(4, center_in_gt=False), anchors, [1], boxes)
    assert torch.equal(mine, torch.stack(ref)) and (mine[0] == 0).any()


def test_an_image_without_boxes_is_all_background():
    anchors, locations, _, _ = random_case(random.Random(0))
    boxes = [torch.zeros((0, 6)) for _ in anchors]
    gt, _, valid = pad_targets(boxes, [torch.zeros(0, dtype=torch.long) for _ in anchors], CPU, min_boxes=4)
    assert gt.shape == (len(anchors), 4, 6) and not valid.any()
    assert (atss_match(gt, valid, torch.stack(anchors), locations, 3) == -1).all()
    assert (atss_match(gt, valid, torch.stack(anchors), locations, 3, num_boxes=[0] * len(anchors)) == -1).all()


@pytest.mark.parametrize(
    "batch_size, fraction, min_neg, pool_size",
    [(64, 0.3, 16, 20), (8, 0.5, 1, 2), (64, 0.3, 16, 0.5), (6, 0.25, 3, 10), (16, 0.1, 1, 3)],
)
def test_sampler_counts_and_rule_equal_monai(batch_size, fraction, min_neg, pool_size):
    monai_sampler = HardNegativeSampler(batch_size, fraction, min_neg=min_neg, pool_size=pool_size)
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        anchors = [50, 400, 3000][trial % 3]
        matched = torch.full((3, anchors), -1)
        for row in range(3):
            n_pos = [0, 1, 5, 30, anchors // 2][(trial + row) % 5]
            matched[row, torch.randperm(anchors, generator=gen)[:n_pos]] = 0
            matched[row, torch.randperm(anchors, generator=gen)[: anchors // 10]] = -2  # neither (may hit a positive)
        # coarse scores: ties at the pool's edge
        scores = torch.randint(0, 40, (3, anchors), generator=gen).float() / 7
        pos, neg = sample_anchors(matched, scores, batch_size, fraction, min_neg, pool_size, generator=gen)
        for row in range(3):
            ref_pos, ref_neg = monai_sampler([matched[row] + 1], scores[row])
            assert int(pos[row].sum()) == int(ref_pos[0].sum()) and int(neg[row].sum()) == int(ref_neg[0].sum())
            assert (matched[row][pos[row]] >= 0).all() and (matched[row][neg[row]] == -1).all()
            # the rule: every negative drawn is among the `pool` hardest (by score) background anchors
            background = scores[row][matched[row] == -1]
            num_pos = min(int((matched[row] >= 0).sum()), int(batch_size * fraction))
            num_neg = min(background.numel(), max(int(max(1, num_pos) * abs(1 - 1 / fraction)), min_neg))
            pool = min(background.numel(), int(num_neg * pool_size))
            assert int(neg[row].sum()) == min(num_neg, pool)
            if pool:
                edge = background.topk(pool).values[-1]
                assert (scores[row][neg[row]] >= edge).all()


@pytest.mark.parametrize("fraction", [0.3, 0.1, 1 / 3, 0.7, 0.25, 0.55])
@pytest.mark.parametrize("pool_size", [20, 0.5, 2.5, 10, 1 / 3])
def test_sample_counts_are_monais_python_arithmetic(fraction, pool_size):
    sampler = HardNegativeSampler(200, fraction, min_neg=7, pool_size=pool_size)
    num_positive = torch.arange(0, 200).repeat_interleave(3)
    num_negative = torch.tensor([0, 5, 10**6]).repeat(200)
    num_pos, num_neg, pool = sample_counts(num_positive, num_negative, 200, fraction, 7, pool_size)
    for p, n, got_pos, got_neg, got_pool in zip(num_positive, num_negative, num_pos, num_neg, pool):
        want_pos = sampler.get_num_pos(torch.empty(int(p)))
        want_neg = sampler.get_num_neg(torch.empty(int(n)), want_pos)
        assert (int(got_pos), int(got_neg)) == (want_pos, want_neg)
        assert int(got_pool) == min(int(n), int(want_neg * pool_size))


def test_sampler_draws_at_random_from_the_whole_pool():
    matched = torch.full((1, 1000), -1)
    matched[0, :40] = 0
    scores = torch.arange(1000.0)[None]  # the pool of 2 * 16 negatives is anchors 968..999
    seen_pos, seen_neg = torch.zeros(1000, dtype=torch.bool), torch.zeros(1000, dtype=torch.bool)
    for _ in range(30):
        pos, neg = sample_anchors(matched, scores, 32, 0.5, 16, 2)
        seen_pos |= pos[0]
        seen_neg |= neg[0]
    assert seen_pos[:40].all() and not seen_pos[40:].any()  # 16 of 40 positives each time, all reached
    assert seen_neg[968:].all() and not seen_neg[:968].any()


class FixedSampler(HardNegativeSampler):
    """A HardNegativeSampler that returns given masks, image after image (to feed MONAI the same sample)."""

    def __init__(self, positives: torch.Tensor, negatives: torch.Tensor) -> None:
        super().__init__(1, 0.5)
        self.masks = list(zip(positives, negatives))

    def __call__(self, target_labels, concat_fg_probs):
        pos, neg = self.masks.pop(0)
        return [pos.to(torch.uint8)], [neg.to(torch.uint8)]


def monai_detector_on(detector_cls_loss=None):
    detector = tiny_detector()
    detector.set_sync_free(False)
    if detector_cls_loss is not None:
        detector.set_cls_loss(detector_cls_loss)
    return detector


def test_losses_equal_monai_for_the_same_sample():
    rng, gen = random.Random(7), torch.Generator().manual_seed(7)
    detector = monai_detector_on()
    bundle_sampler = detector.fg_bg_sampler
    compared = 0
    for _ in range(10):
        anchors, locations, boxes, labels = random_case(rng)
        batch, num_anchors = len(anchors), anchors[0].shape[0]
        cls_logits = torch.randn(batch, num_anchors, 2, generator=gen) * 3
        box_regression = torch.randn(batch, num_anchors, 6, generator=gen)
        detector.fg_bg_sampler = bundle_sampler
        loss = SyncFreeRetinaNetLoss.from_detector(detector)
        mine = loss(cls_logits, box_regression, boxes, labels, anchors, locations)
        detector.fg_bg_sampler = FixedSampler(mine.positives, mine.negatives)
        targets = [{"box": b, "label": lab} for b, lab in zip(boxes, labels)]
        ref = detector.compute_loss(
            {"classification": cls_logits, "box_regression": box_regression}, targets, anchors, locations
        )
        torch.testing.assert_close(mine.cls_loss, ref["classification"])
        torch.testing.assert_close(mine.box_loss, ref["box_regression"].to(mine.box_loss))
        compared += int(mine.positives.sum())
    assert compared > 50


def test_a_non_finite_output_left_out_of_the_sample_still_makes_the_losses_nan():
    anchors, locations, boxes, labels = random_case(random.Random(3))
    detector = monai_detector_on()
    loss = SyncFreeRetinaNetLoss.from_detector(detector)
    cls_logits = torch.randn(len(anchors), anchors[0].shape[0], 2)
    box_regression = torch.randn(len(anchors), anchors[0].shape[0], 6)
    clean = loss(cls_logits, box_regression, boxes, labels, anchors, locations)
    assert clean.finite and math.isfinite(clean.cls_loss) and math.isfinite(clean.box_loss)
    background = int((clean.matched_idxs[0] == -1).nonzero()[0])
    box_regression[0, background, 0] = math.nan  # at a background anchor: no loss term reads it
    result = loss(cls_logits, box_regression, boxes, labels, anchors, locations)
    assert not result.finite and math.isnan(result.cls_loss) and math.isnan(result.box_loss)
    loss.propagate_nonfinite = False
    result = loss(cls_logits, box_regression, boxes, labels, anchors, locations)
    assert math.isfinite(result.cls_loss) and math.isfinite(result.box_loss)


def sample_batch(num: int = 2, empty: int | str | None = None):
    """``num`` tiny crops with their boxes; ``empty``: the index of a crop without boxes, or ``"all"``."""
    samples = [tiny_sample(i, shape=(64, 64, 32)) for i in range(num)]
    images = [s["image"].as_tensor() for s in samples]
    targets = [{"box": s["box"], "label": s["label"]} for s in samples]
    for i in range(num) if empty == "all" else [] if empty is None else [empty]:
        targets[i] = {"box": torch.zeros((0, 6)), "label": torch.zeros(0, dtype=torch.long)}
    return images, targets


def forward_backward(detector, images, targets, dtype: torch.dtype | None = None):
    detector.network.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        losses = detector(images, [dict(t) for t in targets])
    (losses["classification"] + losses["box_regression"].to(losses["classification"])).backward()
    grads = {k: p.grad.clone() for k, p in detector.network.named_parameters() if p.grad is not None}
    return losses, grads


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("empty", [None, 1, "all"])
def test_detector_forward_has_no_sync_and_equals_monai_when_sampling_everything(empty, dtype):
    """
    fp32, and under bf16 autocast (the ``amp_dtype`` option). A batch without any box leaves the regression head
    without gradients on both paths (its backward skipped).
    """
    torch.manual_seed(0)
    detector = tiny_detector()
    detector.set_sync_free(False)  # MONAI's path first (train.json trains sync-free)
    # a sampler that takes every positive and every negative: both paths draw the same (whole) sample
    detector.set_hard_negative_sampler(batch_size_per_image=10**6, positive_fraction=0.5, min_neg=10**7, pool_size=2)
    detector.train()
    images, targets = sample_batch(empty=empty)
    detector(images, [dict(t) for t in targets])  # anchors generated and cached outside the count

    with SyncCounter() as monai_count:
        ref, ref_grads = forward_backward(detector, images, targets, dtype)
    detector.set_sync_free(True)
    with SyncCounter() as sync_free_count:
        mine, grads = forward_backward(detector, images, targets, dtype)

    assert monai_count.total > 20, monai_count.counts
    assert sync_free_count.total == 0, sync_free_count.counts
    for key in ("classification", "box_regression"):
        torch.testing.assert_close(mine[key], ref[key].to(mine[key]))
    for name in ref[ANCHOR_SCORES]:
        torch.testing.assert_close(mine[ANCHOR_SCORES][name], ref[ANCHOR_SCORES][name])
    assert ref_grads.keys() == grads.keys()
    regression = [n for n, _ in detector.network.named_parameters() if n.startswith("regression_head.")]
    assert regression and (set(regression).isdisjoint(grads) if empty == "all" else set(regression) <= set(grads))
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-7)


def test_the_bundle_sampler_counts_in_the_detector():
    detector = tiny_detector()  # train.json: batch_size_per_image=64, positive_fraction=0.3, pool 20, min_neg 16
    detector.set_sync_free(True)
    detector.train()
    images, targets = sample_batch()
    captured = {}
    original = SyncFreeRetinaNetLoss.__call__

    def spy(self, *args, **kwargs):
        captured["result"] = result = original(self, *args, **kwargs)
        return result

    SyncFreeRetinaNetLoss.__call__ = spy
    try:
        detector(images, [dict(t) for t in targets])
    finally:
        SyncFreeRetinaNetLoss.__call__ = original
    result = captured["result"]
    for row in range(len(images)):
        num_matched = int((result.matched_idxs[row] >= 0).sum())
        num_pos = min(num_matched, 19)
        assert int(result.positives[row].sum()) == num_pos
        assert int(result.negatives[row].sum()) == max(int(max(1, num_pos) * abs(1 - 1 / 0.3)), 16)


def test_heads_switch_keeps_the_state_dict_and_outputs():
    detector = tiny_detector()
    detector.set_sync_free(False)
    network = detector.network
    keys = list(network.state_dict().keys())
    images, _ = sample_batch()
    x = torch.stack(images)
    network.train()
    torch.manual_seed(0)
    before = network(x)
    detector.set_sync_free(True)
    assert type(network.classification_head) is SyncFreeClassificationHead
    assert type(network.regression_head) is SyncFreeRegressionHead
    assert list(network.state_dict().keys()) == keys
    torch.manual_seed(0)
    after = network(x)
    for key in before:
        for a, b in zip(before[key], after[key]):
            assert torch.equal(a, b)
    detector.set_sync_free(False)
    assert type(network.classification_head).__name__ == "RetinaNetClassificationHead"
    assert list(network.state_dict().keys()) == keys


def test_a_non_finite_logit_makes_the_losses_nan_instead_of_raising():
    detector = tiny_detector()
    detector.set_sync_free(False)
    detector.train()
    images, targets = sample_batch()
    with torch.no_grad():
        detector.network.classification_head.cls_logits.bias[0] = math.inf  # one channel: a few anchors only
    with pytest.raises(ValueError, match="NaN or Inf"):
        detector(images, [dict(t) for t in targets])  # MONAI's heads raise
    detector.set_sync_free(True)
    with SyncCounter() as count:
        losses = detector(images, [dict(t) for t in targets])
    assert count.total == 0
    assert math.isnan(float(losses["classification"])) and math.isnan(float(losses["box_regression"]))


@pytest.mark.slow
def test_the_guarded_trainer_runs_the_sync_free_detector(tmp_path):
    trainer, guard = make_trainer(tmp_path, epochs=1)
    trainer.detector.set_sync_free(True)
    reports = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: reports.append(engine.state.output))

    @trainer.on(Events.ITERATION_STARTED(once=3))
    def _corrupt(engine):
        with torch.no_grad():
            engine.network.feature_extractor.body.conv1.weight.fill_(float("nan"))

    trainer.run()
    # NaN logits: a "logits" event as when MONAI's heads raise, decided in the trainer's one read
    assert [r.event for r in reports] == [None, None, "logits", None]
    assert all(math.isfinite(r.loss) and r.positive_score > 0 for r in (reports[0], reports[1], reports[3]))
    assert guard.counters["rollbacks"] == 1 and finite_weights(trainer.network)


@pytest.mark.slow
@pytest.mark.parametrize("sync_free", [True, False], ids=["sync_free", "monai"])
def test_non_finite_logits_are_refused_when_guarded_and_raise_the_zoos_error_when_not(tmp_path, sync_free):
    # MONAI's heads raise their ValueError mid-forward (caught: the step is refused); the sync-free heads flag it
    batch = next(iter(tiny_loader(1)))
    for guarded in (True, False):
        trainer, _ = make_trainer(tmp_path / str(guarded), epochs=1, enabled=guarded)
        trainer.detector.set_sync_free(sync_free)
        with torch.no_grad():
            trainer.network.classification_head.cls_logits.bias.fill_(math.inf)
        before = state_of(trainer)
        if not guarded:
            with pytest.raises(ValueError, match=r"^cls_logits is NaN or Inf\.$"):
                trainer.train_step(batch, fire_events=False)
            continue
        report = trainer.train_step(batch, fire_events=False)
        assert report.event == "logits" and math.isnan(report.loss) and report.bad_files == report.files
        assert_same_state(before, state_of(trainer))  # the BatchNorm statistics of the forward put back too


def test_a_matcher_the_sync_free_path_does_not_reproduce_names_the_setting_that_trains_it():
    detector = tiny_detector()
    detector.set_regular_matcher(fg_iou_thresh=0.5, bg_iou_thresh=0.4)  # MONAI's IoU matcher, not ATSS
    detector.train()
    images, targets = sample_batch()
    with pytest.raises(NotImplementedError, match=r"ATSS matcher .*--detector#sync_free False$"):
        detector(images, [dict(t) for t in targets])
    detector.set_sync_free(False)
    losses = detector(images, [dict(t) for t in targets])
    assert math.isfinite(float(losses["classification"]))


def test_image_padding_equals_monai_without_syncs():
    from monai.apps.detection.utils.detector_utils import pad_images
    from monai.data import MetaTensor
    from scripts.detection.detector import _pad_image_list

    images = [torch.rand(1, 60, 64, 30), MetaTensor(torch.rand(1, 64, 50, 32)), torch.rand(1, 33, 17, 9)]
    ref, _ = pad_images(images, 3, (16, 16, 8))
    with SyncCounter() as count:
        mine = _pad_image_list(images, 3, (16, 16, 8))
    assert count.total == 0 and type(mine) is torch.Tensor
    assert mine.shape == ref.shape == (3, 1, 64, 64, 32) and torch.equal(mine, torch.as_tensor(ref))


def test_sync_counter_counts_the_sync_ops():
    x = torch.arange(-5.0, 5.0)
    with SyncCounter() as count:
        x.sum().item()
        torch.where(x > 0)
        x[x > 0]
        x.masked_select(x > 0)
        torch.unique(x)
        x[torch.tensor([1, 2])]  # an integer index is no sync
        x.topk(3)
    assert count.counts == {"_local_scalar_dense": 1, "nonzero": 1, "index": 1, "masked_select": 1, "_unique2": 1}
    assert count.total == 5


@pytest.mark.parametrize("sync_free", [True, False], ids=["sync_free", "monai"])
def test_the_full_recipe_forward_runs_on_a_cuda_device_without_reading_it(sync_free):
    """
    No GPU needed: under `FakeTensorMode` a ``cuda`` tensor has a device, a shape and a type but no values, so an op
    that reads values on the host (``item``, ``nonzero``, boolean masks, ``numpy``: the host syncs of a GPU) raises,
    and so does a host tensor mixed into device arithmetic. train.json's detector (ResNet50-FPN) at its patch and
    batch (192x192x80, 4), with crops holding several boxes, a box at the border and no box; MONAI's path reads the
    boxes on the host and fails here, which shows the check can.
    """
    from scripts.tools.count_train_syncs import build_detector
    from torch._subclasses.fake_tensor import FakeTensorMode

    detector = build_detector(tiny=False)
    detector.set_sync_free(sync_free)
    detector.train()
    shape = (192, 192, 80)
    boxes = [
        [[20.0, 30.0, 10.0, 32.0, 41.0, 18.0], [100.0, 90.0, 40.0, 140.0, 120.0, 70.0]],
        [[0.0, 0.0, 0.0, 12.0, 9.0, 6.0]],  # at the crop's corner
        [],
        [[150.0, 170.0, 60.0, 192.0, 192.0, 80.0]],  # at the opposite border
    ]
    with FakeTensorMode(allow_non_fake_inputs=True):
        detector.to("cuda")
        images = [torch.rand(1, *shape, device="cuda") for _ in boxes]
        targets = [
            {
                "box": torch.tensor(b, device="cuda").reshape(-1, 6),
                "label": torch.zeros(len(b), dtype=torch.long, device="cuda"),
            }
            for b in boxes
        ]
        if not sync_free:
            with pytest.raises(RuntimeError):
                detector(images, targets)
            return
        losses = detector(images, targets)
    for key in ("classification", "box_regression", "heads_finite", *losses[ANCHOR_SCORES]):
        value = losses[key] if key in losses else losses[ANCHOR_SCORES][key]
        assert value.device == torch.device("cuda", 0) and value.shape == (), key
    assert losses["classification"].dtype == losses["box_regression"].dtype == torch.float32
    assert losses["heads_finite"].dtype == torch.bool
