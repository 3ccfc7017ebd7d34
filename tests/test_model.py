"""The chapter's architecture: shapes, named outputs, and where gradients flow."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny
from flax.training.train_state import TrainState

from dlfb_localization.evaluate import reconstruct
from dlfb_localization.model import LocalizationModel
from dlfb_localization.model.decoder import (
    _upsample2_weights,
    resize_then_conv,
    upsample2_conv3x3,
)
from dlfb_localization.model.quantizer import lookup_codes
from dlfb_localization.train import compute_losses

TINY = tiny.CHAPTER
CHAPTER = dict(
    num_classes=50,
    embedding_dim=64,
    num_embeddings=512,
    commitment_cost=0.25,
    dropout_rate=0.45,
    classification_head_layers=2,
)


@pytest.fixture(scope="module")
def tiny():
    model = LocalizationModel(**TINY)
    state = model.create_train_state(
        jax.random.key(0), np.zeros((1, 16, 16, 1), np.float32), optax.adam(1e-3)
    )
    images = np.random.default_rng(0).random((4, 16, 16, 1), dtype=np.float32)
    return model, state.params, images


def _abstract_outputs(config: dict, input_shape: tuple[int, ...]):
    """Output shapes of init + forward, traced without compiling or computing."""
    model = LocalizationModel(**config)
    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)

    def forward(rng, x):
        variables = model.init(rng, x[:1], is_training=False)
        outputs = model.apply(
            variables, x, is_training=False, method=LocalizationModel.compute_outputs
        )
        return variables["params"], outputs

    return jax.eval_shape(forward, jax.random.key(0), x)


def test_chapter_shapes():
    params, outputs = _abstract_outputs(CHAPTER, (2, 100, 100, 1))

    assert params["vector_quantizer"]["codebook"].shape == (64, 512)
    assert outputs.vq.quantized.shape == (2, 25, 25, 64)
    assert outputs.vq.indices.shape == (2, 25, 25)
    assert outputs.decoded.shape == (2, 100, 100, 1)
    assert outputs.logits.shape == (2, 50)
    # Flattened 25 x 25 x 64 latents -> 1000 hidden units -> 50 classes.
    head = params["classification_head"]
    assert head["Dense_0"]["kernel"].shape == (25 * 25 * 64, 1000)
    assert head["Dense_1"]["kernel"].shape == (1000, 50)
    encoder = params["encoder"]
    assert encoder["conv1"]["kernel"].shape == (4, 4, 1, 32)
    assert encoder["conv2"]["kernel"].shape == (4, 4, 32, 64)
    assert params["decoder"]["upsample1"]["conv"]["kernel"].shape == (3, 3, 64, 32)


def test_decoder_output_channels_follow_the_input():
    _, outputs = _abstract_outputs(TINY, (2, 16, 16, 3))

    assert outputs.decoded.shape == (2, 16, 16, 3)


@pytest.mark.parametrize("shape", [(2, 5, 7, 3, 2), (1, 2, 2, 1, 1), (2, 25, 25, 4, 3)])
def test_upsampling_from_the_small_image_is_resize_then_conv(shape):
    batch, height, width, channels, out = shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, height, width, channels)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, channels, out)), jnp.float32)

    def loss(fn, x, kernel):
        return jnp.sum(jnp.sin(fn(x, kernel)))

    def gradients(fn):
        return jax.jit(jax.grad(functools.partial(loss, fn), argnums=(0, 1)))

    # Jitted, as the decoder runs them (and faster to compile than op by op).
    chapter = functools.partial(resize_then_conv, upfactor=2)
    np.testing.assert_allclose(
        jax.jit(upsample2_conv3x3)(x, kernel),
        jax.jit(chapter)(x, kernel),
        rtol=1e-5,
        atol=1e-4,
    )
    # Including the border ring, and the gradients for both arguments.
    for ours, theirs in zip(
        gradients(upsample2_conv3x3)(x, kernel),
        gradients(chapter)(x, kernel),
        strict=True,
    ):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_the_border_strips_weights_are_the_bilinear_resize_weights(n):
    # Resizing the identity along its last axis gives the weight each input
    # pixel has in each output pixel: the values `upsample2_conv3x3`'s border
    # strips hold as constants. Exact: they are 0.25, 0.75 and 1.
    resized = jax.image.resize(np.eye(n, dtype=np.float32), (n, 2 * n), "bilinear")
    np.testing.assert_array_equal(_upsample2_weights(n), resized)


def test_one_head_layer_is_a_single_dense():
    params, _ = _abstract_outputs(
        {**TINY, "classification_head_layers": 1}, (2, 16, 16, 1)
    )

    assert set(params["classification_head"]) == {"Dense_0"}
    assert params["classification_head"]["Dense_0"]["kernel"].shape == (4 * 4 * 8, 4)


def test_call_returns_the_chapter_tuple(tiny):
    model, params, images = tiny

    @jax.jit
    def both(x):
        variables = {"params": params}
        outputs = model.apply(
            variables, x, is_training=False, method=LocalizationModel.compute_outputs
        )
        return model.apply(variables, x, is_training=False), outputs

    (decoded, perplexity, codebook_loss, commitment_loss, logits), outputs = both(
        images
    )

    np.testing.assert_array_equal(decoded, outputs.decoded)
    np.testing.assert_array_equal(logits, outputs.logits)
    assert perplexity == outputs.vq.perplexity
    assert codebook_loss == outputs.vq.codebook_loss
    assert commitment_loss == outputs.vq.commitment_loss
    assert 1.0 <= float(perplexity) <= TINY["num_embeddings"]


def test_encoding_indices_look_up_the_forward_latents(tiny):
    model, params, images = tiny

    @jax.jit
    def both(x):
        apply = functools.partial(model.apply, {"params": params})
        outputs = apply(x, is_training=False, method=LocalizationModel.compute_outputs)
        # The codes as the lookup uses them (unit columns: the cosine lookup).
        codebook = apply(method=lambda m: m.vector_quantizer.lookup_codebook())
        return (
            apply(x, method=LocalizationModel.get_encoding_indices),
            outputs,
            codebook,
        )

    indices, outputs, codebook = both(images)

    assert indices.shape == (4, 4, 4)
    np.testing.assert_array_equal(indices, outputs.vq.indices)
    np.testing.assert_allclose(np.linalg.norm(codebook, axis=0), 1.0, rtol=1e-5)
    # The decoder saw exactly these codes: the straight-through output is bit-equal.
    np.testing.assert_array_equal(lookup_codes(indices, codebook), outputs.vq.quantized)


def test_gradients_flow_where_the_paper_says(tiny):
    model, params, images = tiny
    batch = {"images": images, "labels": np.arange(4, dtype=np.int32)}

    @jax.jit
    def loss_terms(params):
        outputs = model.apply(
            {"params": params},
            images,
            is_training=False,
            method=LocalizationModel.compute_outputs,
        )
        losses = compute_losses(outputs, batch, classification_weight=0.0)
        names = ("recon_loss", "codebook_loss", "commitment_loss")
        return {name: losses[name] for name in names} | {
            "ablated_total": losses["total_loss"],
            "classification_loss": losses["classification_loss"],
        }

    grads = jax.jacrev(loss_terms)(params)

    def nonzero(tree) -> bool:
        return any(np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(tree))

    codebook = {name: g["vector_quantizer"] for name, g in grads.items()}
    encoder = {name: g["encoder"] for name, g in grads.items()}
    head = {name: g["classification_head"] for name, g in grads.items()}
    # The codebook learns from the codebook loss only (straight-through output).
    assert nonzero(codebook["codebook_loss"])
    for name in ("recon_loss", "commitment_loss", "classification_loss"):
        assert not nonzero(codebook[name]), name
    # The encoder learns from reconstruction and commitment, not the codebook loss.
    assert nonzero(encoder["recon_loss"])
    assert nonzero(encoder["commitment_loss"])
    assert not nonzero(encoder["codebook_loss"])
    # With classification_weight=0 the head is ablated, though its loss exists.
    assert nonzero(head["classification_loss"])
    assert not nonzero(head["ablated_total"])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("embedding_dim", 7),
        ("num_embeddings", 0),
        ("dropout_rate", 1.0),
        ("classification_head_layers", 0),
        ("commitment_cost", -0.1),
        ("dtype", jnp.float16),
    ],
)
def test_invalid_hyperparameters_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        LocalizationModel(**{**TINY, field: value})


def test_standardized_inputs_make_codes_blind_to_brightness(tiny):
    model, params, images = tiny
    brighter = 3.0 * images + 0.2  # the same pattern, imaged brighter

    @functools.partial(jax.jit, static_argnums=0)  # compiled, as in training
    def indices(m, x):
        return m.apply(
            {"params": params}, x, method=LocalizationModel.get_encoding_indices
        )

    np.testing.assert_array_equal(indices(model, images), indices(model, brighter))
    raw = LocalizationModel(**TINY, standardize_inputs=False)
    assert not np.array_equal(indices(raw, images), indices(raw, brighter))

    # Reconstructions come back on the input's own scale.
    state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.identity())
    np.testing.assert_allclose(
        reconstruct(state, brighter), 3.0 * reconstruct(state, images) + 0.2, atol=1e-4
    )
    outputs = jax.jit(
        lambda x: model.apply(
            {"params": params},
            x,
            is_training=False,
            method=LocalizationModel.compute_outputs,
        )
    )(images)
    targets = np.asarray(outputs.targets)
    np.testing.assert_allclose(targets.mean(axis=(1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(targets.std(axis=(1, 2)), 1.0, atol=1e-4)


def test_bfloat16_computes_in_bfloat16_and_keeps_float32_where_it_matters(tiny):
    model, params, images = tiny
    mixed = LocalizationModel(**TINY, dtype=jnp.bfloat16)
    # The same parameter tree, all float32: bfloat16 is a compute setting only.
    mixed_params = mixed.create_train_state(
        jax.random.key(0), np.zeros((1, 16, 16, 1), np.float32), optax.adam(1e-3)
    ).params
    assert jax.tree.structure(mixed_params) == jax.tree.structure(params)
    assert {x.dtype for x in jax.tree.leaves(mixed_params)} == {jnp.dtype("float32")}

    def run(m, method, *args):
        # One compiled program per call (op by op, this test compiled ~230).
        return jax.jit(lambda p: m.apply({"params": p}, *args, method=method))(params)

    exact = run(model, LocalizationModel.compute_outputs, images, False)
    approx = run(mixed, LocalizationModel.compute_outputs, images, False)
    # Outputs come back as float32: the quantizer and the losses see float32.
    assert approx.decoded.dtype == approx.logits.dtype == jnp.float32
    assert approx.vq.quantized.dtype == jnp.float32
    # Each part agrees to bfloat16's precision, given the same input (a code
    # near a tie may flip, so the decoder and head get the float32 codes).
    for method, args in [
        (LocalizationModel.encode, (images,)),
        (LocalizationModel.decode, (exact.vq.quantized, 1)),
        (LocalizationModel.classify, (exact.vq.quantized, False)),
    ]:
        want = run(model, method, *args)
        got = run(mixed, method, *args)
        assert got.dtype == jnp.float32
        assert not np.array_equal(got, want)
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(got, want, atol=0.03 * scale)
