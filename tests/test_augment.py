"""Augmentation of training clips: frames and masks stay aligned, every transform is the one it
claims, and a step's augmentation is a pure function of (seed, step) on 1 or N processes."""
import pytest
import torch

from transmem.config import ConfigError, load_experiment
from transmem.models import create_model
from transmem.training import ForecastModule, SamplingSchedule
from transmem.training.augment import augment_clips, draw_augment


def _clips(b=6, t=4, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames = torch.rand(b, t, 1, h, w, generator=g)
    return frames, frames > 0.5  # a mask tied to the values: alignment is checkable


@pytest.mark.parametrize("ops,crop", [(("flip",), 0), (("rot90",), 0), (("flip", "rot90"), 4), ((), 6)])
def test_frames_and_masks_stay_aligned(ops, crop):
    frames, valid = _clips()
    g = torch.Generator().manual_seed(3)
    f2, v2 = augment_clips(frames, valid, ops, crop, g)
    size = crop or 8
    assert f2.shape == (6, 4, 1, size, size) and v2.shape == f2.shape
    assert torch.equal(v2, f2 > 0.5)
    # the values are a rearrangement of each clip's own values (nothing invented or mixed)
    if not crop:
        for a, b in zip(frames, f2):
            assert torch.equal(a.flatten().sort().values, b.flatten().sort().values)


def test_each_transform_is_the_one_drawn():
    frames, valid = _clips(b=8)
    g = torch.Generator().manual_seed(5)
    params = draw_augment(8, ("flip", "rot90"), torch.Generator().manual_seed(5), square=True)
    out, _ = augment_clips(frames, valid, ("flip", "rot90"), 0, g)
    assert len({tuple(p.tolist()) for p in params}) > 1  # the clips got different transforms
    for x, y, (lr, ud, k) in zip(frames, out, params.tolist()):
        ref = x.flip(-1) if lr else x
        ref = ref.flip(-2) if ud else ref
        assert torch.equal(y, torch.rot90(ref, k, dims=(-2, -1)))


def test_crop_windows_come_from_the_clip():
    frames, valid = _clips(b=4, h=8, w=8)
    out, _ = augment_clips(frames, valid, (), 4, torch.Generator().manual_seed(1))
    for x, y in zip(frames, out):
        hits = [(i, j) for i in range(5) for j in range(5) if torch.equal(x[..., i:i + 4, j:j + 4], y)]
        assert hits


def test_same_seed_and_step_same_augmentation_across_process_counts():
    frames, valid = _clips(b=8)
    one = augment_clips(frames, valid, ("flip", "rot90"), 4, torch.Generator().manual_seed(9))
    again = augment_clips(frames, valid, ("flip", "rot90"), 4, torch.Generator().manual_seed(9))
    assert torch.equal(one[0], again[0])
    # two processes, each with every other clip of the same global batch
    for rank in (0, 1):
        part = augment_clips(frames[rank::2], valid[rank::2], ("flip", "rot90"), 4,
                             torch.Generator().manual_seed(9), world=2, rank=rank)
        assert torch.equal(part[0], one[0][rank::2]) and torch.equal(part[1], one[1][rank::2])


def test_module_draws_depend_on_seed_and_step_only():
    model = create_model("convlstm", num_layers=1, hidden=4, filter_size=3, patch_size=2)
    sched = SamplingSchedule(kind="linear", t_in=2, frames=4, stop_step=10)
    frames, valid = _clips(b=4)
    a = ForecastModule(model, sched, seed=1, augment=("flip", "rot90"), crop=4)
    b = ForecastModule(model, sched, seed=1, augment=("flip", "rot90"), crop=4)
    fa, va, ma = a._draws(frames, valid)
    fb, vb, mb = b._draws(frames, valid)
    assert torch.equal(fa, fb) and torch.equal(va, vb) and torch.equal(ma, mb)
    assert fa.shape[-1] == 4 and torch.equal(va, fa > 0.5)
    # the sampling mask is the one drawn without augmentation
    plain = ForecastModule(model, sched, seed=1)
    assert torch.equal(plain._draws(frames, valid)[2], ma)


def test_config_refuses_unknown_augmentation(tmp_path):
    with pytest.raises(ConfigError, match="train.augment"):
        load_experiment(overrides={"train.augment": "flip,warp"})
    exp = load_experiment(overrides={"train.augment": "flip,rot90", "train.crop": "8"})
    assert exp.train.augment == ["flip", "rot90"] and exp.train.crop == 8


def test_native_frames_that_are_not_square_are_cropped_then_turned():
    """A 10x14 grid (a radar composite's shape) with rot90: each clip is a square crop of its own
    frames, then flipped and turned as drawn; masks follow."""
    frames, valid = _clips(b=6, h=10, w=14)
    out, vout = augment_clips(frames, valid, ("flip", "rot90"), 6, torch.Generator().manual_seed(2))
    assert out.shape == (6, 4, 1, 6, 6) and torch.equal(vout, out > 0.5)
    for x, y in zip(frames, out):
        crops = [x[..., i:i + 6, j:j + 6] for i in range(5) for j in range(9)]
        turned = [torch.rot90(c.flip(-1) if lr else c, k, dims=(-2, -1)).flip(-2) if ud else
                  torch.rot90(c.flip(-1) if lr else c, k, dims=(-2, -1))
                  for c in crops for lr in (0, 1) for ud in (0, 1) for k in range(4)]
        assert any(torch.equal(y, t) for t in turned)
    with pytest.raises(ValueError, match="square"):
        augment_clips(frames, valid, ("rot90",), 0, torch.Generator())


def test_the_memory_check_counts_a_training_crop_not_the_whole_frame():
    """A 1 km composite trains on crops: its training batch is the crop's, not the whole field's,
    so the config loads; the same batch on whole 640x640 frames is refused in one line."""
    base = {"data": {"name": "advected_rain", "size": 640, "frames": 18, "train_clips": 4, "val_clips": 1,
                     "test_clips": 1},
            "model": {"name": "advection", "num_layers": 2, "hidden": 32, "patch_size": 4},
            "train": {"batch_size": 8, "t_in": 6, "crop": 128}, "eval": {"batch_size": 1}}
    exp = load_experiment(base=base)
    assert exp.train.crop == 128
    with pytest.raises(ConfigError, match="GiB of batch"):
        load_experiment(base={**base, "train": {**base["train"], "crop": 0}})
