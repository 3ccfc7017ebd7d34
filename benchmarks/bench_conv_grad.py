"""A 3x3 convolution's forward pass and gradients, and its kernel gradient
computed other ways: is XLA's the one to keep on this CPU?

Run by hand (never by the tests):

    python benchmarks/bench_conv_grad.py                  # 25x25, 64 channels
    python benchmarks/bench_conv_grad.py --size 50 --channels 32

The chapter's residual blocks run 3x3 convolutions at 25x25 with 64 channels,
and `train` runs them on passes of 16 frames (`default_microbatches`). XLA's
CPU backend computes a kernel gradient as a convolution whose window spans the
image; `profile_train_step.py` puts these at 18 to 31% of a step, by machine.
This times, on one batch, jitted and after a warm-up: the forward pass, the
input's gradient, XLA's kernel gradient, and the kernel gradient as one matrix
product of the im2col patches and as nine per-tap products. It prints one JSON
object: milliseconds per call, the frames per second each would pass, the
largest relative difference of the alternatives from XLA's kernel gradient,
and the process's peak resident memory.
"""

import argparse
import json
import platform
import resource
import time

import jax
import jax.numpy as jnp
from jax import lax

from dlfb_localization.hugepages import restart_with_huge_pages


def _conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return lax.conv_general_dilated(
        x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _shifted(x: jax.Array) -> list[jax.Array]:
    """The nine 3x3 taps' views of `x` padded by one (row-major taps)."""
    _, h, w, _ = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return [padded[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)]


def kernel_grad_im2col(x: jax.Array, dy: jax.Array) -> jax.Array:
    patches = jnp.concatenate(_shifted(x), axis=-1)
    grad = jnp.einsum("bhwk,bhwo->ko", patches, dy)
    return grad.reshape(3, 3, x.shape[-1], dy.shape[-1])


def kernel_grad_taps(x: jax.Array, dy: jax.Array) -> jax.Array:
    taps = [jnp.einsum("bhwc,bhwo->co", tap, dy) for tap in _shifted(x)]
    return jnp.stack(taps).reshape(3, 3, x.shape[-1], dy.shape[-1])


def _ms_per_call(fn, *args, calls: int) -> tuple[float, jax.Array]:
    fn = jax.jit(fn)
    out = jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(calls):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls * 1e3, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=25)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()

    keys = jax.random.split(jax.random.key(0), 3)
    shape = (args.batch_size, args.size, args.size, args.channels)
    x = jax.random.normal(keys[0], shape)
    kernel = 0.1 * jax.random.normal(keys[1], (3, 3, args.channels, args.channels))
    dy = jax.random.normal(keys[2], shape)

    def input_grad(x, kernel, dy):
        return jax.vjp(lambda x: _conv(x, kernel), x)[1](dy)[0]

    def kernel_grad(x, kernel, dy):
        return jax.vjp(lambda kernel: _conv(x, kernel), kernel)[1](dy)[0]

    timings = {
        "forward": _ms_per_call(_conv, x, kernel, calls=args.calls),
        "input_grad": _ms_per_call(input_grad, x, kernel, dy, calls=args.calls),
        "kernel_grad_xla": _ms_per_call(kernel_grad, x, kernel, dy, calls=args.calls),
        "kernel_grad_im2col": _ms_per_call(kernel_grad_im2col, x, dy, calls=args.calls),
        "kernel_grad_taps": _ms_per_call(kernel_grad_taps, x, dy, calls=args.calls),
    }
    reference = timings["kernel_grad_xla"][1]
    scale = float(jnp.max(jnp.abs(reference)))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {
        "ms_per_call": {name: round(ms, 3) for name, (ms, _) in timings.items()},
        "images_per_second": {
            name: round(args.batch_size / ms * 1e3, 1)
            for name, (ms, _) in timings.items()
        },
        "max_relative_difference_from_xla": {
            name: float(jnp.max(jnp.abs(timings[name][1] - reference)) / scale)
            for name in ("kernel_grad_im2col", "kernel_grad_taps")
        },
        "peak_rss_mib": peak / (1024**2 if platform.system() == "Darwin" else 1024),
        **vars(args),
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    restart_with_huge_pages()
    main()
