"""``sliding_window_probabilities`` equals MONAI's ``sliding_window_inference`` (gaussian) without MONAI."""

from __future__ import annotations

import weakref

import pytest
import torch

from lorkd.inference.sliding_window import (
    WindowModel,
    count_windows,
    gaussian_weights,
    sliding_window_probabilities,
)

inferers = pytest.importorskip("monai.inferers")
monai_utils = pytest.importorskip("monai.data.utils")


class Recorder:
    """A small random conv net that remembers every window batch it was given."""

    def __init__(self, channels: int = 3) -> None:
        torch.manual_seed(0)
        self.net = torch.nn.Conv3d(1, channels, 3, padding=1)
        self.batches: list[torch.Tensor] = []

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        self.batches.append(windows.clone())
        with torch.no_grad():
            return torch.sigmoid(self.net(windows))


CASES = [  # image shape, window, overlap, window batch
    ((20, 17, 9), (8, 8, 4), 0.5, 2),  # sizes not multiples of the step
    ((5, 6, 3), (8, 8, 4), 0.5, 3),  # smaller than the window on every axis: padded with cval
    ((13, 8, 2), (8, 8, 4), 0.25, 1),  # equal on one axis, smaller on another
    ((31, 29, 11), (8, 6, 5), 0.7, 4),  # odd window, high overlap, batches with a remainder
    ((16, 16, 8), (8, 8, 4), 0.0, 5),  # no overlap
    ((8, 8, 4), (8, 8, 4), 0.5, 2),  # exactly one window
]


@pytest.mark.parametrize(("shape", "window", "overlap", "batch"), CASES)
def test_equals_monai_window_for_window(shape, window, overlap, batch):
    image = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(1))
    ours_model, monai_model = Recorder(), Recorder()
    ours = sliding_window_probabilities(image, ours_model, window, overlap, batch, cval=-1.5)
    theirs = inferers.sliding_window_inference(
        image, window, batch, monai_model, overlap, mode="gaussian", sigma_scale=0.125,
        padding_mode="constant", cval=-1.5, sw_device="cpu", device="cpu",
    )[0]
    assert ours.shape == theirs.shape == (3, *shape) and ours.dtype == torch.float32
    assert (ours - theirs).abs().max().item() <= 1e-6
    assert len(ours_model.batches) == len(monai_model.batches)  # the network sees the same batches
    for a, b in zip(ours_model.batches, monai_model.batches):
        assert torch.equal(a, b)
    assert sum(len(b) for b in ours_model.batches) == count_windows(shape, window, overlap)


@pytest.mark.parametrize(("shape", "window", "overlap", "batch"), CASES[:3])
def test_blending_into_a_view_of_a_larger_zero_buffer_gives_the_same_floats(shape, window, overlap, batch):
    """``out``: blended in place when the image needs no padding, else copied there; returned either way,
    nothing written outside it."""
    image = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(2))
    alone = sliding_window_probabilities(image, Recorder(), window, overlap, batch, cval=-1.5)
    buffer = torch.zeros((3, *(s + 4 for s in shape)))
    view = buffer[:, 1 : 1 + shape[0], 2 : 2 + shape[1], 3 : 3 + shape[2]]
    into = sliding_window_probabilities(image, Recorder(), window, overlap, batch, cval=-1.5, out=view)
    assert into is view and torch.equal(view, alone)
    assert buffer.sum().item() == pytest.approx(alone.sum().item())  # zeros around the view
    with pytest.raises(ValueError, match="out must be"):
        sliding_window_probabilities(image, Recorder(), window, overlap, batch, out=torch.zeros((3, 2, 2, 2)))


def test_a_window_batch_is_freed_before_the_next_one_runs():
    recorder, outputs, alive = Recorder(), [], []

    def model(windows: torch.Tensor) -> torch.Tensor:
        alive.append(any(ref() is not None for ref in outputs))
        out = recorder(windows)
        outputs.append(weakref.ref(out))
        return out

    sliding_window_probabilities(torch.randn(1, 1, 20, 17, 9), model, (8, 8, 4), 0.5, sw_batch_size=2)
    assert len(alive) > 2 and not any(alive)


@pytest.mark.parametrize("window", [(8, 8, 4), (7, 5, 3), (64, 64, 32)])
def test_gaussian_weights_equal_monai(window):
    expected = monai_utils.compute_importance_map(window, mode="gaussian", sigma_scale=0.125)
    assert torch.equal(gaussian_weights(window), expected)


def test_window_model_progress_counts_every_window():
    class Net(torch.nn.Module):
        def encode(self, windows):
            from types import SimpleNamespace

            return SimpleNamespace(per_voxel=[windows])

        def decode(self, features, queries):
            return [features.per_voxel[0].expand(-1, queries.shape[0], -1, -1, -1)]

    seen: list[int] = []
    model = WindowModel(Net(), torch.zeros(2, 4), max_queries=1, progress=seen.append)
    image = torch.zeros(1, 1, 20, 17, 9)
    out = sliding_window_probabilities(image, model, (8, 8, 4), 0.5, sw_batch_size=3)
    assert sum(seen) == count_windows((20, 17, 9), (8, 8, 4), 0.5) and max(seen) == 3
    torch.testing.assert_close(out, torch.full((2, 20, 17, 9), 0.5))  # sigmoid(0) blended stays 0.5


def test_bad_image_and_overlap_fail_clearly():
    with pytest.raises(ValueError, match="expected an image"):
        sliding_window_probabilities(torch.zeros(1, 2, 4, 4, 4), Recorder(), (4, 4, 4))
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_probabilities(torch.zeros(1, 1, 4, 4, 4), Recorder(), (4, 4, 4), overlap=1.0)
