"""The quantizer's pure math: nearest codes, straight-through gradient, losses,
codebook usage. No module init needed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlfb_localization.model.quantizer import (
    compute_code_usage,
    compute_codebook_loss,
    compute_commitment_loss,
    compute_distances,
    find_nearest_codes,
    first_argmin,
    lookup_codes,
    quantize,
)

EMBEDDING_DIM, NUM_EMBEDDINGS = 8, 16


@pytest.fixture
def inputs_and_codebook():
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(2, 4, 4, EMBEDDING_DIM)).astype(np.float32)
    codebook = rng.normal(size=(EMBEDDING_DIM, NUM_EMBEDDINGS)).astype(np.float32)
    return inputs, codebook


def test_nearest_codes_match_brute_force(inputs_and_codebook):
    inputs, codebook = inputs_and_codebook
    flat = inputs.reshape(-1, EMBEDDING_DIM).astype(np.float64)
    brute = ((flat[:, :, None] - codebook[None].astype(np.float64)) ** 2).sum(axis=1)

    indices = find_nearest_codes(jnp.asarray(inputs), jnp.asarray(codebook))

    assert indices.shape == (2, 4, 4)
    assert indices.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(indices).ravel(), brute.argmin(axis=1))
    np.testing.assert_allclose(
        compute_distances(jnp.asarray(flat, jnp.float32), jnp.asarray(codebook)),
        brute,
        rtol=1e-4,
        atol=1e-4,
    )
    # The data must make the test discriminating: many different codes chosen.
    assert len(np.unique(indices)) > NUM_EMBEDDINGS // 2


@pytest.mark.parametrize("k", [512, 96, 48, 32])
def test_blockwise_argmin_is_argmin_with_ties_nan_and_infinities(k):
    # Small integers make many equal minima, within a block and across blocks.
    distances = np.random.default_rng(k).integers(0, 4, (300, k)).astype(np.float32)
    distances[0, [k - 1, 3]] = np.nan  # the first NaN wins, wherever the minimum
    distances[1] = np.nan
    distances[2] = np.inf
    distances[3, k // 2] = -np.inf
    distances[4] = 7.0  # all equal: the first index
    distances[5, [k - 1, k - 2]] = -1.0  # the minimum in the last block

    indices = jax.jit(first_argmin)(jnp.asarray(distances))

    expected = np.argmin(distances, axis=1)  # NumPy: the first NaN, else first min
    np.testing.assert_array_equal(np.asarray(indices), expected)
    assert list(expected[:6]) == [3, 0, 0, k // 2, 0, k - 2]


def test_quantized_equals_chosen_codebook_columns(inputs_and_codebook):
    inputs, codebook = inputs_and_codebook

    quantized, indices = quantize(jnp.asarray(inputs), jnp.asarray(codebook))

    flat_indices = np.asarray(indices).ravel()
    expected = codebook[:, flat_indices].T.reshape(inputs.shape)
    np.testing.assert_array_equal(np.asarray(quantized), expected)
    np.testing.assert_array_equal(
        lookup_codes(indices, jnp.asarray(codebook)), expected
    )


def test_straight_through_gradient_is_exactly_ones(inputs_and_codebook):
    inputs, codebook = inputs_and_codebook

    grad = jax.grad(lambda x: jnp.sum(quantize(x, jnp.asarray(codebook))[0]))(
        jnp.asarray(inputs)
    )

    np.testing.assert_array_equal(np.asarray(grad), np.ones_like(inputs))


def test_straight_through_output_gives_codebook_no_gradient(inputs_and_codebook):
    inputs, codebook = inputs_and_codebook

    grad = jax.grad(lambda c: jnp.sum(quantize(jnp.asarray(inputs), c)[0] ** 2))(
        jnp.asarray(codebook)
    )

    assert not np.any(np.asarray(grad))


def test_codebook_loss_moves_only_codes_and_commitment_only_inputs(
    inputs_and_codebook,
):
    inputs, codebook = inputs_and_codebook
    indices = find_nearest_codes(jnp.asarray(inputs), jnp.asarray(codebook))

    def losses(x, c):
        codes = lookup_codes(indices, c)
        return compute_codebook_loss(x, codes), compute_commitment_loss(x, codes, 0.25)

    (d_codebook_dx, d_codebook_dc), (d_commit_dx, d_commit_dc) = jax.jacrev(
        losses, argnums=(0, 1)
    )(jnp.asarray(inputs), jnp.asarray(codebook))

    assert not np.any(np.asarray(d_codebook_dx))
    assert not np.any(np.asarray(d_commit_dc))
    assert np.any(np.asarray(d_codebook_dc))
    assert np.any(np.asarray(d_commit_dx))
    # Unused codes get no gradient, used ones do.
    used = np.zeros(NUM_EMBEDDINGS, bool)
    used[np.asarray(indices).ravel()] = True
    touched = np.any(np.asarray(d_codebook_dc) != 0, axis=0)
    np.testing.assert_array_equal(touched, used)


def test_losses_are_the_paper_terms(inputs_and_codebook):
    inputs, codebook = inputs_and_codebook
    codes = np.asarray(
        lookup_codes(find_nearest_codes(inputs, codebook), jnp.asarray(codebook))
    )
    squared_error = np.mean((inputs.astype(np.float64) - codes) ** 2)

    codebook_loss = compute_codebook_loss(jnp.asarray(inputs), jnp.asarray(codes))
    commitment_loss = compute_commitment_loss(
        jnp.asarray(inputs), jnp.asarray(codes), 0.25
    )

    np.testing.assert_allclose(codebook_loss, squared_error, rtol=1e-6)
    np.testing.assert_allclose(commitment_loss, 0.25 * squared_error, rtol=1e-6)


def test_uniform_use_gives_perplexity_k_and_full_usage():
    indices = jnp.tile(jnp.arange(NUM_EMBEDDINGS), 5).reshape(5, 4, 4)

    usage = compute_code_usage(indices, NUM_EMBEDDINGS)

    np.testing.assert_allclose(usage.perplexity, NUM_EMBEDDINGS, rtol=1e-5)
    assert usage.used_fraction == 1.0
    np.testing.assert_allclose(usage.max_share, 1 / NUM_EMBEDDINGS)


def test_single_code_gives_perplexity_one():
    indices = jnp.full((3, 4, 4), 7)

    usage = compute_code_usage(indices, NUM_EMBEDDINGS)

    np.testing.assert_allclose(usage.perplexity, 1.0, rtol=1e-6)
    np.testing.assert_allclose(usage.used_fraction, 1 / NUM_EMBEDDINGS)
    assert usage.max_share == 1.0


def test_usage_of_skewed_codes():
    # Codes 0 and 1 take 3/4 and 1/4 of the positions.
    indices = jnp.array([0, 0, 0, 1] * 4)

    usage = compute_code_usage(indices, NUM_EMBEDDINGS)

    entropy = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    np.testing.assert_allclose(usage.perplexity, np.exp(entropy), rtol=1e-5)
    np.testing.assert_allclose(usage.used_fraction, 2 / NUM_EMBEDDINGS)
    np.testing.assert_allclose(usage.max_share, 0.75)


def test_cosine_lookup_picks_the_most_similar_unit_code_whatever_the_scale(
    inputs_and_codebook,
):
    from dlfb_localization.model.quantizer import VectorQuantizer

    inputs, codebook = inputs_and_codebook
    vq = VectorQuantizer(NUM_EMBEDDINGS, EMBEDDING_DIM, 0.25, normalize=True)
    params = {"params": {"codebook": jnp.asarray(codebook)}}
    out = vq.apply(params, jnp.asarray(inputs))
    flat = inputs.reshape(-1, EMBEDDING_DIM)
    cosine = (flat / np.linalg.norm(flat, axis=1, keepdims=True)) @ (
        codebook / np.linalg.norm(codebook, axis=0, keepdims=True)
    )
    np.testing.assert_array_equal(np.asarray(out.indices).ravel(), cosine.argmax(1))
    # What is passed on are unit codes, so the decoder and the head see the
    # same scale however large the encoder's outputs grow.
    np.testing.assert_allclose(np.linalg.norm(out.quantized, axis=-1), 1, rtol=1e-5)
    scaled = vq.apply(params, jnp.asarray(inputs) * 100.0)
    np.testing.assert_array_equal(scaled.indices, out.indices)
    np.testing.assert_allclose(scaled.quantized, out.quantized, atol=1e-6)
    np.testing.assert_allclose(scaled.codebook_loss, out.codebook_loss, rtol=1e-4)
    # The raw norms are still reported, for the health monitor.
    np.testing.assert_allclose(
        scaled.latent_norm, 100 * np.linalg.norm(flat, axis=1).mean(), rtol=1e-4
    )
    # The chapter's Euclidean lookup of the same vectors differs.
    euclidean = VectorQuantizer(NUM_EMBEDDINGS, EMBEDDING_DIM, 0.25).apply(
        params, jnp.asarray(inputs) * 100.0
    )
    assert not np.array_equal(euclidean.indices, out.indices)
