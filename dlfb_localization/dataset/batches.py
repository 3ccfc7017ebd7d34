"""Batches from a memory map, gathered with NumPy indexing only."""

from collections.abc import Iterator

import jax
import numpy as np


def numpy_rng(rng) -> np.random.Generator:
    """A NumPy generator seeded from a JAX key (typed or raw) or an int.

    Data order is a pure function of the key: the same key gives the same order.
    """
    if isinstance(rng, np.random.Generator):
        raise TypeError("pass a JAX key or an int seed, not a NumPy Generator")
    if isinstance(rng, int | np.integer):
        return np.random.default_rng(int(rng))
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    return np.random.default_rng(np.asarray(rng, dtype=np.uint32).ravel().tolist())


def iterate_batches(
    frames: np.ndarray,
    frame_ids: np.ndarray,
    codes: np.ndarray,
    batch_size: int,
    rng=None,
    *,
    shuffle: bool = True,
    drop_remainder: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields `{"frame_ids", "images", "labels"}` batches of a split.

    Args:
      frames: `[n_all, h, w, c]` array or memmap indexed by frame id.
      frame_ids: `[n]` the split's frame ids, ascending.
      codes: `[n]` class codes aligned with `frame_ids`.
      batch_size: frames per batch.
      rng: JAX key or int; required when shuffling.
      shuffle: visit frames in a random order (training) or in `frame_ids` order.
      drop_remainder: drop the last partial batch (training); inference keeps it.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = len(frame_ids)
    if drop_remainder and n < batch_size:
        raise ValueError(
            f"batch_size {batch_size} is larger than the split's {n} frames, so no "
            "batch would be yielded; lower batch_size or pass drop_remainder=False"
        )
    if shuffle:
        if rng is None:
            raise ValueError("shuffle=True needs rng (a JAX key or an int seed)")
        order = numpy_rng(rng).permutation(n)
    else:
        order = np.arange(n)
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
        positions = order[start : start + batch_size]
        if shuffle:
            # Sorted reads are sequential on disk; the batch's members are unchanged.
            positions = np.sort(positions)
        ids = frame_ids[positions]
        yield {
            "frame_ids": ids,
            "images": np.asarray(frames[ids], dtype=np.float32),
            "labels": codes[positions],
        }
