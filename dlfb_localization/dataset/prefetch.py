"""Prefetching: the next batches are read and put on the device while a step runs."""

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import jax

_DONE = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def _put(value, device):
    if isinstance(device, jax.sharding.Sharding) and not device.is_fully_addressable:
        # Several hosts (jax.distributed): every host holds the same global batch
        # and contributes the rows of its own devices.
        return jax.make_array_from_process_local_data(device, value, value.shape)
    return jax.device_put(value, device)


def prefetch_to_device(
    batches: Iterable[dict[str, Any]],
    size: int = 2,
    *,
    device: Any = None,
    keep_on_host: tuple[str, ...] = ("frame_ids",),
) -> Iterator[dict[str, Any]]:
    """Yields `batches` in order, each already transferred to `device`.

    A background thread gathers up to `size` batches ahead (NumPy indexing on the
    memmap releases the GIL, so this overlaps with a running step) and starts
    their host-to-device copies with `jax.device_put`, which is asynchronous.

    Args:
      batches: an iterable of dicts of NumPy arrays, e.g. `Dataset.get_batches`.
      size: how many batches to hold ready; memory is `size` batches.
      device: a `jax.Device` or `jax.sharding.Sharding` (default: the default
        device).
      keep_on_host: keys left as NumPy arrays (bookkeeping the step never reads).

    Yields:
      The same dicts with all other values as `jax.Array`s.

    Raises:
      Whatever the underlying iterator raises, in the consumer's thread.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    ready: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                moved = {
                    key: value if key in keep_on_host else _put(value, device)
                    for key, value in batch.items()
                }
                if not put(moved):
                    return
            put(_DONE)
        except BaseException as error:  # handed to the consumer, not lost
            put(_Failure(error))

    thread = threading.Thread(target=produce, name="prefetch_to_device", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        # The consumer stopped (end, error or break): let the producer finish.
        stop.set()
        thread.join()
