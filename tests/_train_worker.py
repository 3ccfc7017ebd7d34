"""A tiny, fully seeded training run, shared by the checkpoint tests.

Run as a script it trains into a store path, so a test can kill the process
mid-run and start it again:

    python tests/_train_worker.py STORE_PATH [--seconds-per-batch 0.2] [--report]

With --report it prints the final metrics as JSON and saves the trained model's
outputs on the validation frames to STORE_PATH/outputs.npz, so runs on different
device counts can be compared. With --process I --processes N --coordinator
HOST:PORT it is process I of N of one distributed JAX run (CPU devices, Gloo
collectives); each process then writes its report and parameters to
STORE_PATH/process_I/.
"""

import argparse
import functools
import json
import logging
import os
import time
from collections.abc import Iterator

import jax
import numpy as np
import optax
import tiny
from flax import traverse_util

from dlfb_localization.dataset import Dataset
from dlfb_localization.history import History
from dlfb_localization.model import LocalizationModel
from dlfb_localization.train import TrainState, train

NUM_EPOCHS = 6
BATCH_SIZE = 8
TRAIN_FRAMES = 24  # three steps per epoch
EVAL_EVERY = 2
# Nonzero dropout, so that resuming has to repeat the dropout masks.
MODEL = LocalizationModel(**{**tiny.CHAPTER, "dropout_rate": 0.1})
# One optimizer object for every run in a process: a new one recompiles the step.
TX = optax.adam(1e-3)


def make_splits() -> dict[str, Dataset]:
    """Random 16x16x1 crops of 4 proteins; valid has a partial last batch."""
    rng = np.random.default_rng(0)
    splits = {}
    for name, n in (("train", TRAIN_FRAMES), ("valid", 10)):
        images = rng.random((n, 16, 16, 1), dtype=np.float32)
        splits[name] = Dataset.from_arrays(images, np.arange(n) % 4)
    return splits


class SlowBatches:
    """A dataset whose batches take `seconds_per_batch` longer (same content)."""

    def __init__(self, dataset: Dataset, seconds_per_batch: float):
        self._dataset = dataset
        self._seconds_per_batch = seconds_per_batch

    def __getattr__(self, name):
        return getattr(self._dataset, name)

    def __len__(self) -> int:
        return len(self._dataset)

    def get_batches(self, *args, **kwargs) -> Iterator[dict[str, np.ndarray]]:
        for batch in self._dataset.get_batches(*args, **kwargs):
            time.sleep(self._seconds_per_batch)
            yield batch


def make_state(seed: int = 0, tx: optax.GradientTransformation = TX) -> TrainState:
    dummy_input = np.zeros((1, 16, 16, 1), dtype=np.float32)
    return MODEL.create_train_state(jax.random.key(seed), dummy_input, tx)


def run(
    store_path,
    *,
    splits: dict | None = None,
    state: TrainState | None = None,
    batch_size: int = BATCH_SIZE,
) -> tuple[TrainState, History]:
    """Trains the reference run (seeded) into `store_path`."""
    return train(
        state=make_state() if state is None else state,
        rng=jax.random.key(1),
        dataset_splits=make_splits() if splits is None else splits,
        num_epochs=NUM_EPOCHS,
        batch_size=batch_size,
        classification_weight=1.0,
        eval_every=EVAL_EVERY,
        store_path=store_path,
    )


def local_params(state: TrainState) -> dict:
    """The parameters as this process holds them (its copy of the replicas)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state.params)


def predict_valid(state: TrainState, splits: dict[str, Dataset]) -> dict:
    """The model's `decoded` and `logits` for all validation frames."""
    valid = splits["valid"].get_batches(None, 64, shuffle=False, drop_remainder=False)
    images = next(valid)["images"]
    # One compiled program rather than one per op: a worker process pays for
    # every compilation.
    apply = jax.jit(functools.partial(state.apply_fn, is_training=False))
    decoded, *_, logits = apply({"params": local_params(state)}, images)
    return {"decoded": np.asarray(decoded), "logits": np.asarray(logits)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store_path")
    parser.add_argument("--seconds-per-batch", type=float, default=0.0)
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--process", type=int)
    parser.add_argument("--processes", type=int)
    parser.add_argument("--coordinator")
    args = parser.parse_args()
    out = args.store_path
    if args.processes:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            args.coordinator, num_processes=args.processes, process_id=args.process
        )
        out = f"{args.store_path}/process_{args.process}"
    # The library's own logger only (absl already configured the root logger).
    library_logger = logging.getLogger("dlfb_localization")
    library_logger.addHandler(logging.StreamHandler())
    library_logger.setLevel(logging.INFO)
    splits = make_splits()
    if args.seconds_per_batch:
        splits["train"] = SlowBatches(splits["train"], args.seconds_per_batch)
    state, metrics = run(args.store_path, splits=splits)
    if args.report:
        os.makedirs(out, exist_ok=True)
        np.savez(f"{out}/outputs.npz", **predict_valid(state, splits))
        flat = traverse_util.flatten_dict(local_params(state), sep="/")
        np.savez(f"{out}/params.npz", **flat)
        report = {
            "devices": jax.device_count(),
            "processes": jax.process_count(),
            "metrics": metrics,
        }
        print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    main()
