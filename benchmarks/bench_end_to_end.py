"""End-to-end training throughput against the train step alone, same process.

Run by hand (never by the tests):

    python benchmarks/bench_end_to_end.py --workdir /tmp/dlfb_bench_e2e

Writes a generator release of `--proteins` x 4 fields x 20 crops (once; reused
if present), builds the chapter's splits from its cache, and at the chapter's
configuration (`RunConfig`'s defaults: batch 256, K=512, D=64, Adam 1e-3; one
class per protein, 50 by default):

1. trains one epoch with `train` to compile both steps (not timed);
2. for each of `--rounds` rounds, times one epoch of `train` (shuffled
   batches from the memmap, the prefetching thread, host-to-device copies,
   metric logging, the end-of-epoch bookkeeping and the copy of the state onto
   the devices), with a validation split of 8 frames so that the time is the
   training pass's, then the same number of `train_step` calls on one batch
   already on the device, placed as `train` places it, with the same passes
   per step, continuing from the same state. Alternating the two keeps drift
   in the machine's speed out of their ratio.

Prints JSON with both rates and their ratio per round (1.0: the pipeline costs
nothing), and the median ratio.
"""

import argparse
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dlfb_localization.dataset import Dataset
from dlfb_localization.dataset.synthetic import SyntheticSpec, write_release
from dlfb_localization.hugepages import restart_with_huge_pages
from dlfb_localization.runs import RunConfig, build_splits, create_state
from dlfb_localization.train import (
    DataParallel,
    default_microbatches,
    train,
    train_step,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proteins", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dlfb_bench_e2e"))
    args = parser.parse_args()

    spec = SyntheticSpec(n_proteins=args.proteins, fovs_per_protein=4, crops_per_fov=20)
    data = args.workdir / f"release_{spec.n_proteins}p"
    if not (data / "Label_data00.csv").exists():
        write_release(data, spec, progress=True)
    config = RunConfig(data=str(data))
    splits = build_splits(config, progress=True)
    train_split = splits["train"]
    small_valid = Dataset.from_arrays(
        np.zeros((8, *train_split.image_shape), np.float32), np.arange(8) % 2
    )
    datasets = {"train": train_split, "valid": small_valid}

    steps = len(train_split) // args.batch_size
    microbatches = default_microbatches(args.batch_size, jax.device_count())
    # The step-only batch and state are placed as `train` places them, so both
    # paths run the same compiled program.
    parallel = DataParallel()
    batch = next(train_split.get_batches(jax.random.key(2), args.batch_size))
    batch = jax.device_put(
        {k: batch[k] for k in ("images", "labels")},
        parallel.batch_sharding(args.batch_size),
    )
    rng, weight = jax.random.key(3), jnp.float32(1.0)

    def time_epoch(state):
        start = time.perf_counter()
        state, _ = train(state, jax.random.key(1), datasets, 1, args.batch_size, 1.0)
        jax.block_until_ready(state)
        return state, time.perf_counter() - start

    def time_steps(state):
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = train_step(state, batch, rng, weight, microbatches)
        jax.block_until_ready(metrics)
        return state, time.perf_counter() - start

    # Compile both paths, then alternate them on one state so that drift in
    # the machine's speed (a few % over minutes on shared cores) and in the
    # state's numbers hits both alike.
    # The chapter's model and optimizer, as `RunConfig`'s defaults build them.
    state, _ = time_epoch(create_state(config, splits))
    state, _ = time_steps(state)
    ratios, end_to_end, step_only = [], [], []
    for _ in range(args.rounds):
        state, train_s = time_epoch(state)
        state, step_s = time_steps(state)
        end_to_end.append(steps * args.batch_size / train_s)
        step_only.append(steps * args.batch_size / step_s)
        ratios.append(end_to_end[-1] / step_only[-1])

    print(
        json.dumps(
            {
                # e.g. glibc.malloc.hugetlb=1 (`dlfb_localization.hugepages`)
                "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
                "train_frames": len(train_split),
                "steps": steps,
                "batch_size": args.batch_size,
                "microbatches": microbatches,
                "rounds": args.rounds,
                "end_to_end_images_per_s": [round(x, 2) for x in end_to_end],
                "step_only_images_per_s": [round(x, 2) for x in step_only],
                "end_to_end_over_step_only": [round(x, 4) for x in ratios],
                "median_ratio": round(float(np.median(ratios)), 4),
                "backend": jax.default_backend(),
                "devices": jax.device_count(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    # Measures what the command line runs: malloc with huge pages, unless
    # GLIBC_TUNABLES says otherwise (`dlfb_localization.hugepages`).
    restart_with_huge_pages()
    main()
