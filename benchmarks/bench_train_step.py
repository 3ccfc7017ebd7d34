"""Train-step throughput and peak memory at the chapter's configuration.

Run by hand (never by the tests):

    python benchmarks/bench_train_step.py              # the chapter's settings
    python benchmarks/bench_train_step.py --steps 20   # a steadier estimate
    python benchmarks/bench_train_step.py --microbatches 1  # one pass per step
    python benchmarks/bench_train_step.py --dtype bfloat16  # mixed precision
    python benchmarks/bench_train_step.py --peak-tflops 989  # share of a peak

It times `train_step` on random 100x100x1 inputs (batch 256, K=512, D=64, 50
classes, Adam 1e-3) after warm-up steps that include compilation, with the
passes per step that `train` uses (`default_microbatches`), and prints one JSON
object: images per second, seconds per step, compile time, the process's peak
resident memory and, on CPU, the step's share of this machine's float32 matmul
rate measured in the same process (a 2048^3 `jnp.dot`, best of 5 rounds),
counting `FLOP_PER_IMAGE` for a train step. With `--peak-tflops` (e.g. a GPU's
datasheet peak for the dtype) it also prints the step's share of that peak. Per
timed step it prints the CPU seconds spent in user code and in the kernel, and
the minor page faults (on Linux, the kernel's part is mostly zeroing the memory
that each step's fresh buffers fault in).
"""

import argparse
import json
import os
import platform
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dlfb_localization.hugepages import restart_with_huge_pages
from dlfb_localization.model import LocalizationModel
from dlfb_localization.train import default_microbatches, train_step

# XLA's cost analysis of the chapter's train step (batch 256, K=512, D=64, 50
# classes) with the chapter's resize-then-conv decoder: the yardstick the
# targets are stated in, kept fixed so that changes to the step's arithmetic do
# not move it.
FLOP_PER_IMAGE = 2.01e9


def build_parser(description: str) -> argparse.ArgumentParser:
    """The chapter's configuration as flags (`make_step_inputs` reads them);
    `benchmarks/profile_train_step.py` uses them too."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=100)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--embedding-dim", type=int, default=64)
    parser.add_argument("--num-embeddings", type=int, default=512)
    parser.add_argument("--num-classes", type=int, default=50)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="compute dtype (parameters stay float32)",
    )
    parser.add_argument(
        "--microbatches", type=int, default=None, help="default: what train uses"
    )
    parser.add_argument(
        "--classification-weight",
        type=float,
        default=1.0,
        help="0 is passed as the number, as train passes the chapter's ablation "
        "(the head's backward pass is skipped)",
    )
    return parser


def _parse_args() -> argparse.Namespace:
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's peak for --dtype, to print the step's share of it",
    )
    return parser.parse_args()


def _peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024**2 if platform.system() == "Darwin" else 1024)


def _matmul_gflops(n: int = 2048, rounds: int = 5, repeats: int = 5) -> float:
    """Best float32 matmul rate of this process's default device, in GFLOP/s."""
    keys = jax.random.split(jax.random.key(0))
    a, b = (jax.random.normal(key, (n, n), jnp.float32) for key in keys)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            out = dot(a, b)
        out.block_until_ready()
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9)
    return best


def _usage_per_step(before, after, args: argparse.Namespace) -> dict[str, float]:
    """CPU seconds (all threads) in user code and in the kernel, and minor page
    faults, per timed step. The kernel's share is mostly zeroing the pages a
    step's fresh buffers fault in (`dlfb_localization.hugepages`)."""
    return {
        "cpu_user_s_per_step": (after.ru_utime - before.ru_utime) / args.steps,
        "cpu_kernel_s_per_step": (after.ru_stime - before.ru_stime) / args.steps,
        "minor_faults_per_step": (after.ru_minflt - before.ru_minflt) / args.steps,
    }


def make_step_inputs(args: argparse.Namespace) -> tuple:
    """`(state, batch, rng_dropout, weight, microbatches)`: the chapter's model
    and Adam at the flags' sizes, one seeded random batch, and the passes
    `train` would use (or `--microbatches`)."""
    model = LocalizationModel(
        num_classes=args.num_classes,
        embedding_dim=args.embedding_dim,
        num_embeddings=args.num_embeddings,
        commitment_cost=0.25,
        dropout_rate=0.45,
        classification_head_layers=2,
        dtype=args.dtype,
    )
    shape = (args.batch_size, args.image_size, args.image_size, args.channels)
    data_rng = np.random.default_rng(args.seed)
    batch = {
        "images": jnp.asarray(data_rng.random(shape, dtype=np.float32)),
        "labels": jnp.asarray(
            data_rng.integers(0, args.num_classes, args.batch_size, dtype=np.int32)
        ),
    }
    rng_init, rng_dropout = jax.random.split(jax.random.key(args.seed))
    state = model.create_train_state(
        rng_init, np.zeros((1, *shape[1:]), np.float32), optax.adam(args.learning_rate)
    )
    microbatches = args.microbatches or default_microbatches(args.batch_size)
    return state, batch, rng_dropout, args.classification_weight, microbatches


def main() -> None:
    args = _parse_args()
    state, batch, rng_dropout, weight, microbatches = make_step_inputs(args)

    start = time.perf_counter()
    for _ in range(args.warmup_steps):
        state, metrics = train_step(state, batch, rng_dropout, weight, microbatches)
    jax.block_until_ready(metrics)
    warmup_s = time.perf_counter() - start

    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = train_step(state, batch, rng_dropout, weight, microbatches)
    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - start
    per_step = _usage_per_step(usage, resource.getrusage(resource.RUSAGE_SELF), args)
    images_per_s = args.steps * args.batch_size / elapsed
    matmul_gflops = _matmul_gflops()

    print(
        json.dumps(
            {
                # e.g. glibc.malloc.hugetlb=1 (`dlfb_localization.hugepages`)
                "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
                "images_per_s": images_per_s,
                "step_gflops": images_per_s * FLOP_PER_IMAGE / 1e9,
                "matmul_gflops": matmul_gflops,
                "fraction_of_matmul_rate": images_per_s
                * FLOP_PER_IMAGE
                / 1e9
                / matmul_gflops,
                "fraction_of_peak": None
                if args.peak_tflops is None
                else images_per_s * FLOP_PER_IMAGE / 1e12 / args.peak_tflops,
                "peak_tflops_assumed": args.peak_tflops,
                "microbatches": microbatches,
                "dtype": args.dtype,
                "s_per_step": elapsed / args.steps,
                **per_step,
                "warmup_s_incl_compile": warmup_s,
                "peak_rss_mib": _peak_rss_mib(),
                "steps": args.steps,
                "warmup_steps": args.warmup_steps,
                "batch_size": args.batch_size,
                "classification_weight": args.classification_weight,
                "input_shape": list(batch["images"].shape[1:]),
                "embedding_dim": args.embedding_dim,
                "num_embeddings": args.num_embeddings,
                "num_classes": args.num_classes,
                "params": sum(x.size for x in jax.tree.leaves(state.params)),
                "final_total_loss": float(metrics["total_loss"]),
                "device": str(jax.devices()[0].device_kind),
                "backend": jax.default_backend(),
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
