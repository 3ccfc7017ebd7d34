"""`map_frames`: every frame once, in order, through one compiled batch shape."""

import jax
import numpy as np
import pytest

from dlfb_localization.dataset import Dataset
from dlfb_localization.inference import map_frames


def test_map_frames_pads_to_one_shape_and_returns_every_frame_in_order():
    images = np.random.default_rng(0).random((11, 3, 3, 2), dtype=np.float32)
    codes = np.arange(11, dtype=np.int32) + 5
    shapes = []

    @jax.jit
    def fn(batch, batch_codes):
        shapes.append((batch.shape, batch_codes.shape))  # once per compilation
        return {"max": batch.max(axis=(1, 2, 3)), "pair": (batch_codes, batch[:, 0])}

    split = Dataset.from_arrays(images, np.arange(11) % 3)
    for frames in (images, split):
        result = map_frames(fn, frames, 4, codes)
        np.testing.assert_array_equal(result["max"], images.max(axis=(1, 2, 3)))
        np.testing.assert_array_equal(result["pair"][0], codes)
        np.testing.assert_array_equal(result["pair"][1], images[:, 0])
    assert shapes == [((4, 3, 3, 2), (4,))]  # 3 batches of 4, compiled once

    # A set smaller than the batch is not padded up to it.
    small = map_frames(lambda batch: np.full(len(batch), len(batch)), images[:2], 4)
    np.testing.assert_array_equal(small, [2, 2])


def test_map_frames_refuses_misaligned_or_empty_input():
    images = np.zeros((3, 2, 2, 1), np.float32)
    with pytest.raises(ValueError, match="must align"):
        map_frames(lambda batch, extra: batch, images, 2, np.zeros(4))
    with pytest.raises(ValueError, match="no images"):
        map_frames(lambda batch: batch, images[:0], 2)
    with pytest.raises(ValueError, match="positive"):
        map_frames(lambda batch: batch, images, 0)
