"""The ViT family's train-step throughput and peak memory.

Run by hand (never by the tests):

    python benchmarks/bench_vit_step.py                      # tiny, subcell, batch 64
    python benchmarks/bench_vit_step.py --size base --dtype bfloat16 --batch-size 256

It times `train_step` of a `ViTModel` on random 100x100 inputs whose labels
make P proteins x K crops (K = 8, as SubCell's 8 cells of a field), with
SubCell's AdamW, after warm-up steps that include compilation, and prints one
JSON object: images per second, seconds per step, the step's FLOPs per image
from XLA's cost analysis of the compiled step (the ViT has no fixed yardstick
such as the chapter's model has), the process's peak resident memory, and the
step's share of this machine's float32 matmul rate (as `bench_train_step`) or,
with `--peak-tflops`, of that peak.
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_train_step import _matmul_gflops, _peak_rss_mib

from dlfb_localization import train as train_module
from dlfb_localization.hugepages import restart_with_huge_pages
from dlfb_localization.model.contrastive import OBJECTIVES
from dlfb_localization.model.vit import VIT_SIZES, ViTModel
from dlfb_localization.run_families import vit_optimizer
from dlfb_localization.train import train_step


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(VIT_SIZES), default="tiny")
    parser.add_argument("--objective", choices=sorted(OBJECTIVES), default="subcell")
    parser.add_argument("--patch-size", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--crops-per-protein", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=100)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-tflops", type=float, default=None)
    return parser.parse_args()


def main() -> None:
    args = _parse_args()
    if args.batch_size % args.crops_per_protein:
        raise SystemExit("--batch-size must be a multiple of --crops-per-protein")
    model = ViTModel(
        size=VIT_SIZES[args.size],
        patch_size=args.patch_size,
        objective=OBJECTIVES[args.objective],
        dtype=args.dtype,
    )
    shape = (args.batch_size, args.image_size, args.image_size, args.channels)
    data_rng = np.random.default_rng(args.seed)
    proteins = args.batch_size // args.crops_per_protein
    batch = {
        "images": jnp.asarray(data_rng.random(shape, dtype=np.float32)),
        "labels": jnp.asarray(
            np.repeat(np.arange(proteins, dtype=np.int32), args.crops_per_protein)
        ),
    }
    rng_init, rng_dropout = jax.random.split(jax.random.key(args.seed))
    # The runs' optimizer: SubCell's AdamW, warmed up then decayed.
    tx = vit_optimizer(1e-4, args.warmup_steps + args.steps)
    state = model.create_train_state(
        rng_init, np.zeros((1, *shape[1:]), np.float32), tx
    )
    weight = jnp.float32(0.0)

    # One pass per step, as `train` runs a family whose samples interact: the
    # one program `train_step` runs then, whose cost XLA counts.
    compiled = train_module._step_program.lower(
        state, batch, rng_dropout, weight, microbatches=1, augment="none"
    ).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flop_per_image = float(cost["flops"]) / args.batch_size

    start = time.perf_counter()
    for _ in range(args.warmup_steps):
        state, metrics = train_step(state, batch, rng_dropout, weight)
    jax.block_until_ready(metrics)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = train_step(state, batch, rng_dropout, weight)
    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - start
    images_per_s = args.steps * args.batch_size / elapsed
    step_gflops = images_per_s * flop_per_image / 1e9
    matmul_gflops = _matmul_gflops() if jax.default_backend() == "cpu" else None
    print(
        json.dumps(
            {
                # e.g. glibc.malloc.hugetlb=1 (`dlfb_localization.hugepages`)
                "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
                "images_per_s": images_per_s,
                "flop_per_image": flop_per_image,
                "step_gflops": step_gflops,
                "matmul_gflops": matmul_gflops,
                "fraction_of_matmul_rate": None
                if matmul_gflops is None
                else step_gflops / matmul_gflops,
                "fraction_of_peak": None
                if args.peak_tflops is None
                else step_gflops / 1e3 / args.peak_tflops,
                "s_per_step": elapsed / args.steps,
                "warmup_s": warmup_s,
                "peak_rss_mib": _peak_rss_mib(),
                "size": args.size,
                "objective": args.objective,
                "patch_size": args.patch_size,
                "batch_size": args.batch_size,
                "dtype": args.dtype,
                "params": sum(x.size for x in jax.tree.leaves(state.params)),
                "final_total_loss": float(metrics["total_loss"]),
                "device": str(jax.devices()[0].device_kind),
                "jax": jax.__version__,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    # Measures what the command line runs: malloc with huge pages, unless
    # GLIBC_TUNABLES says otherwise (`dlfb_localization.hugepages`).
    restart_with_huge_pages()
    main()
