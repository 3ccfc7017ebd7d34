"""Prefetching batches to the device in a background thread."""

import threading

import jax
import numpy as np
import pytest

from dlfb_localization.dataset import Dataset
from dlfb_localization.dataset.prefetch import prefetch_to_device


def _dataset():
    images = np.arange(40 * 4 * 4, dtype=np.float32).reshape(40, 4, 4, 1)
    return Dataset.from_arrays(images, np.arange(40) % 5)


def test_same_batches_in_the_same_order_on_the_device():
    dataset = _dataset()
    plain = list(dataset.get_batches(rng=3, batch_size=8))
    fetched = list(prefetch_to_device(dataset.get_batches(rng=3, batch_size=8), size=3))
    assert len(fetched) == len(plain) == 5
    for a, b in zip(plain, fetched, strict=True):
        assert isinstance(b["images"], jax.Array)
        assert isinstance(b["frame_ids"], np.ndarray)  # kept on the host
        np.testing.assert_array_equal(a["images"], np.asarray(b["images"]))
        np.testing.assert_array_equal(a["labels"], np.asarray(b["labels"]))


def test_reads_ahead_by_at_most_size():
    produced = []

    def source():
        for i in range(10):
            produced.append(i)
            yield {"x": np.full(2, i)}

    batches = prefetch_to_device(source(), size=2)
    first = next(batches)
    assert int(first["x"][0]) == 0
    # One consumed, two waiting in the queue and one blocked in put().
    threading.Event().wait(0.3)
    assert len(produced) <= 4
    batches.close()


def test_errors_reach_the_consumer_and_early_stop_ends_the_thread():
    def broken():
        yield {"x": np.zeros(2)}
        raise RuntimeError("disk gone")

    batches = prefetch_to_device(broken())
    next(batches)
    with pytest.raises(RuntimeError, match="disk gone"):
        next(batches)

    before = threading.active_count()
    batches = prefetch_to_device({"x": np.zeros(2)} for _ in range(100))
    next(batches)
    batches.close()  # a `break` in a for loop does the same
    assert threading.active_count() <= before
