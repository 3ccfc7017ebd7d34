"""Vector quantization: the pure math, and the `VectorQuantizer` module.

The functions here are the VQ-VAE bottleneck of van den Oord et al., "Neural
Discrete Representation Learning" (NeurIPS 2017). They take the codebook as an
argument, so they can be tested and reused without `init`. The codebook is laid
out `[embedding_dim, num_embeddings]`, one code per column, as in the chapter
and in Haiku.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# Keeps log(0) out of the entropy when a code is unused; the book's value.
_LOG_EPSILON = 1e-10


class VQOutput(NamedTuple):
    """What the quantizer returns for a batch of encoder outputs.

    Attributes:
      quantized: `[..., embedding_dim]` straight-through output: the nearest
        codes in the forward pass, the identity of the input in the backward pass.
      indices: `[...]` int32 index of the nearest code at each position.
      codebook_loss: scalar, pulls the codes towards the encoder outputs.
      commitment_loss: scalar, already scaled by `commitment_cost`.
      perplexity: scalar, `exp(entropy)` of code use in the batch, in
        `[1, num_embeddings]`.
      used_fraction: scalar, fraction of the codebook used at least once.
      max_share: scalar, share of all positions taken by the busiest code.
      latents: the encoder outputs as they were quantized, `[..., D]` (split
        into `num_splits` sub-vectors on a new second-to-last axis when the
        quantizer splits; unit vectors when the quantizer normalizes), without
        gradient: what EMA updates and restarts read.
      latent_norm: scalar, mean L2 norm of the encoder's output vectors before
        any normalization: a runaway encoder shows here first.
      codebook_norm: scalar, mean L2 norm of the codebook's entries (before any
        normalization).
    """

    quantized: jax.Array
    indices: jax.Array
    codebook_loss: jax.Array
    commitment_loss: jax.Array
    perplexity: jax.Array
    used_fraction: jax.Array
    max_share: jax.Array
    latents: jax.Array | None = None
    latent_norm: jax.Array | None = None
    codebook_norm: jax.Array | None = None


class CodeUsage(NamedTuple):
    """Codebook health over a batch of code indices (all scalars)."""

    perplexity: jax.Array
    used_fraction: jax.Array
    max_share: jax.Array


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """`x` divided by its L2 norm along `axis` (floored at 1e-6, so a zero
    vector stays zero instead of becoming NaN)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, 1e-6)


def compute_distances(flat_inputs: jax.Array, codebook: jax.Array) -> jax.Array:
    """Squared Euclidean distances between vectors and every code.

    Uses `|x - e|^2 = |x|^2 - 2 <x, e> + |e|^2`, so the work is one matmul rather
    than a `[n, num_embeddings, embedding_dim]` difference tensor.

    Args:
      flat_inputs: `[n, embedding_dim]` vectors.
      codebook: `[embedding_dim, num_embeddings]` codes, one per column.

    Returns:
      `[n, num_embeddings]` squared distances.
    """
    return (
        jnp.sum(jnp.square(flat_inputs), axis=1, keepdims=True)
        - 2 * flat_inputs @ codebook
        + jnp.sum(jnp.square(codebook), axis=0, keepdims=True)
    )


def find_nearest_codes(inputs: jax.Array, codebook: jax.Array) -> jax.Array:
    """Index of the nearest code (squared Euclidean distance) for each vector.

    Args:
      inputs: `[..., embedding_dim]` vectors, e.g. `[batch, h, w, embedding_dim]`.
      codebook: `[embedding_dim, num_embeddings]`.

    Returns:
      `[...]` int32 indices into the codebook's columns.
    """
    flat_inputs = inputs.reshape(-1, codebook.shape[0])
    indices = first_argmin(compute_distances(flat_inputs, codebook))
    return indices.astype(jnp.int32).reshape(inputs.shape[:-1])


def first_argmin(distances: jax.Array, block: int = 32) -> jax.Array:
    """`jnp.argmin(distances, axis=1)`, found block by block: the same indices
    (the first of equal minima; the first NaN where a row has one).

    XLA's CPU backend computes an argmin as a reduction over (value, index)
    pairs, one element at a time: at the demo's configuration (20,000 vectors,
    512 codes) 51 ms of a 510 ms train step on one core. Here only a row's
    minimum over each block of `block` codes is found that way; the plain
    minima are vectorized, and the pair reduction runs over the block minima,
    then within the one block that holds the row's minimum. The step on one
    core went from a median of 62 to 69 images/s (`taskset -c 0 python
    benchmarks/bench_train_step.py --batch-size 32 --embedding-dim 32
    --num-classes 40 --steps 60`, five runs each, interleaved).

    Args:
      distances: `[n, k]`.
      block: codes per block; a plain argmin unless it divides `k` into
        several blocks.

    Returns:
      `[n]` indices into the last axis.
    """
    n, k = distances.shape
    if k % block or k == block:
        return jnp.argmin(distances, axis=1)
    blocks = distances.reshape(n, k // block, block)
    first = jnp.argmin(jnp.min(blocks, axis=2), axis=1)
    chosen = jnp.take_along_axis(blocks, first[:, None, None], axis=1)[:, 0]
    return first * block + jnp.argmin(chosen, axis=1)


def lookup_codes(indices: jax.Array, codebook: jax.Array) -> jax.Array:
    """The codes at `indices`: `codebook[:, indices]` moved to the last axis.

    Args:
      indices: `[...]` integer indices.
      codebook: `[embedding_dim, num_embeddings]`.

    Returns:
      `[..., embedding_dim]` code vectors. Gradients flow into `codebook`.
    """
    return jnp.take(codebook.T, indices, axis=0)


def straight_through(inputs: jax.Array, quantized: jax.Array) -> jax.Array:
    """Straight-through estimator: `quantized` forward, identity backward.

    Argmin has no useful gradient, so the decoder's gradient is copied onto the
    encoder output unchanged (van den Oord et al. 2017, section 3.2).

    Args:
      inputs: `[..., embedding_dim]` encoder outputs `z_e(x)`.
      quantized: same shape, the chosen codes `z_q(x)`.

    Returns:
      Same shape; equals `quantized`, with `d out / d inputs` the identity and no
      gradient into `quantized`.
    """
    # The book's `inputs + sg(quantized - inputs)` differs from `quantized` by
    # rounding; adding an exact zero keeps the forward value bit-equal to the code.
    return lax.stop_gradient(quantized) + (inputs - lax.stop_gradient(inputs))


def quantize(inputs: jax.Array, codebook: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Snaps each vector to its nearest code, with a straight-through gradient.

    Args:
      inputs: `[..., embedding_dim]` encoder outputs.
      codebook: `[embedding_dim, num_embeddings]`.

    Returns:
      `(quantized, indices)`: `[..., embedding_dim]` straight-through output and
      `[...]` int32 code indices.
    """
    indices = find_nearest_codes(inputs, codebook)
    return straight_through(inputs, lookup_codes(indices, codebook)), indices


def compute_codebook_loss(inputs: jax.Array, codes: jax.Array) -> jax.Array:
    """The codebook term `|sg[z_e(x)] - e|^2` of van den Oord et al. 2017, eq. 3.

    The encoder output is a constant here, so only the codebook learns from it.

    Args:
      inputs: `[..., embedding_dim]` encoder outputs `z_e(x)`.
      codes: same shape, the chosen codes `e` (from `lookup_codes`, not the
        straight-through output, which carries no gradient to the codebook).

    Returns:
      Scalar mean over all elements.
    """
    return jnp.mean(jnp.square(codes - lax.stop_gradient(inputs)))


def compute_commitment_loss(
    inputs: jax.Array, codes: jax.Array, commitment_cost: float
) -> jax.Array:
    """The commitment term `beta |z_e(x) - sg[e]|^2` of van den Oord et al. 2017.

    The codes are constants here, so only the encoder learns from it: it keeps the
    encoder outputs from drifting away from the codebook (eq. 3).

    Args:
      inputs: `[..., embedding_dim]` encoder outputs `z_e(x)`.
      codes: same shape, the chosen codes `e`.
      commitment_cost: the paper's beta (0.25 in the paper and the chapter).

    Returns:
      Scalar, `beta` times the mean over all elements.
    """
    return commitment_cost * jnp.mean(jnp.square(lax.stop_gradient(codes) - inputs))


def compute_code_usage(indices: jax.Array, num_embeddings: int) -> CodeUsage:
    """Perplexity, used fraction and busiest-code share of a batch of indices.

    A collapsing codebook shows here first: perplexity and used fraction fall
    while the largest share climbs towards 1.

    Args:
      indices: `[...]` integer code indices (any shape; all positions count).
      num_embeddings: codebook size K.

    Returns:
      `CodeUsage`; perplexity is K for uniform use and 1 for a single code.
    """
    # bincount, not the book's one-hot mean: [positions, K] floats is 300 MB at
    # the chapter's batch of 256 x 25 x 25 positions and 512 codes.
    counts = jnp.bincount(indices.ravel(), length=num_embeddings)
    probs = counts / indices.size
    entropy = -jnp.sum(probs * jnp.log(probs + _LOG_EPSILON))
    return CodeUsage(
        perplexity=jnp.exp(entropy),
        used_fraction=jnp.mean(counts > 0),
        max_share=jnp.max(probs),
    )


def count_codes(indices: jax.Array, num_embeddings: int) -> jax.Array:
    """Per-frame codebook-usage histograms.

    One `bincount` over indices shifted by `frame * num_embeddings` counts all
    frames at once, without the `[positions, num_embeddings]` one-hot tensor.

    Args:
      indices: `[batch, ...]` integer code indices (e.g. `[batch, h, w]`).
      num_embeddings: codebook size K.

    Returns:
      `[batch, num_embeddings]` int32 counts; each row sums to the number of
      positions per frame (`h * w`).
    """
    flat = indices.reshape(indices.shape[0], -1).astype(jnp.int32)
    batch = flat.shape[0]
    offsets = jnp.arange(batch, dtype=jnp.int32)[:, None] * num_embeddings
    counts = jnp.bincount((flat + offsets).ravel(), length=batch * num_embeddings)
    return counts.reshape(batch, num_embeddings).astype(jnp.int32)


def _mean_norm(x: jax.Array, axis: int) -> jax.Array:
    return jnp.mean(jnp.sqrt(jnp.sum(jnp.square(x), axis=axis)))


class VectorQuantizer(nn.Module):
    """Nearest-code bottleneck with a learned codebook.

    With `num_splits=s > 1` (cytoself's "split quantization") each input vector
    of `s * embedding_dim` channels is cut into `s` sub-vectors that are
    quantized separately against the one shared codebook: `s` codes describe a
    position, so a small codebook can express many more combinations.

    Attributes:
      num_embeddings: codebook size K.
      embedding_dim: code length D; the input has `num_splits * D` channels.
      commitment_cost: weight beta of the commitment loss.
      num_splits: sub-vectors per input vector (1: the chapter's quantizer).
      learn_by_gradient: False for codebooks updated by moving averages
        (`model.codebook.update_codebook`): the codes then get no gradient, and
        the codebook loss is reported but does not train anything.
      normalize: look codes up by cosine similarity (Yu et al. 2021,
        "Vector-quantized image modeling with improved VQGAN"): encoder outputs
        and codes are scaled to unit length before the lookup, the losses and
        the straight-through output, so neither can run away from the other in
        scale. False is the chapter's Euclidean lookup of raw vectors.
    """

    num_embeddings: int
    embedding_dim: int
    commitment_cost: float
    num_splits: int = 1
    learn_by_gradient: bool = True
    normalize: bool = False

    def setup(self) -> None:
        self.codebook = self.param(
            "codebook",
            nn.initializers.lecun_uniform(),
            (self.embedding_dim, self.num_embeddings),
        )

    def _split(self, inputs: jax.Array) -> jax.Array:
        expected = self.num_splits * self.embedding_dim
        if inputs.shape[-1] != expected:
            raise ValueError(
                f"the quantizer expects {expected} channels (num_splits "
                f"{self.num_splits} x embedding_dim {self.embedding_dim}), got "
                f"inputs of shape {inputs.shape}"
            )
        if self.num_splits == 1:
            return inputs
        return inputs.reshape(*inputs.shape[:-1], self.num_splits, self.embedding_dim)

    def lookup_space(self, inputs: jax.Array) -> jax.Array:
        """Encoder outputs as the lookup compares them with the codes: split
        into sub-vectors, and scaled to unit length when normalizing."""
        return self._to_lookup_space(self._split(inputs))

    def _to_lookup_space(self, latents: jax.Array) -> jax.Array:
        return l2_normalize(latents) if self.normalize else latents

    def lookup_codebook(self) -> jax.Array:
        """The `[D, K]` codebook as the lookup uses it (unit columns when
        normalizing)."""
        return l2_normalize(self.codebook, axis=0) if self.normalize else self.codebook

    def __call__(self, inputs: jax.Array) -> VQOutput:
        """Quantizes encoder outputs.

        Args:
          inputs: `[batch, h, w, num_splits * embedding_dim]` encoder outputs.

        Returns:
          `VQOutput` with `quantized` shaped like `inputs` and `indices`
          `[batch, h, w]` (`[batch, h, w, num_splits]` when splitting).
        """
        split = self._split(inputs)
        latents = self._to_lookup_space(split)
        codebook = self.lookup_codebook()
        if not self.learn_by_gradient:
            codebook = lax.stop_gradient(codebook)
        quantized, indices = quantize(latents, codebook)
        # A second gather, with gradient into the codebook, for the losses; XLA
        # merges it with the one inside `quantize`.
        codes = lookup_codes(indices, codebook)
        usage = compute_code_usage(indices, self.num_embeddings)
        return VQOutput(
            quantized=quantized.reshape(inputs.shape),
            indices=indices,
            codebook_loss=compute_codebook_loss(latents, codes),
            commitment_loss=compute_commitment_loss(
                latents, codes, self.commitment_cost
            ),
            perplexity=usage.perplexity,
            used_fraction=usage.used_fraction,
            max_share=usage.max_share,
            latents=lax.stop_gradient(latents),
            latent_norm=lax.stop_gradient(_mean_norm(split, axis=-1)),
            codebook_norm=lax.stop_gradient(_mean_norm(self.codebook, axis=0)),
        )

    def get_closest_codebook_indices(self, inputs: jax.Array) -> jax.Array:
        """Nearest-code indices (the chapter's name): `[batch, h, w]`, or
        `[batch, h, w, num_splits]` when splitting."""
        return find_nearest_codes(self.lookup_space(inputs), self.lookup_codebook())
