"""The full cytoself model, split quantization and the codebook switches."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny

from dlfb_localization import evaluate as evaluate_module
from dlfb_localization.dataset.builder import DatasetBuilder
from dlfb_localization.evaluate import evaluate
from dlfb_localization.model import LocalizationModel
from dlfb_localization.model.codebook import (
    CodebookOptions,
    init_codebook_state,
    update_codebook,
)
from dlfb_localization.model.cytoself import CytoselfModel
from dlfb_localization.model.interface import ModelState
from dlfb_localization.model.quantizer import (
    VectorQuantizer,
    compute_code_usage,
    compute_codebook_loss,
    find_nearest_codes,
    lookup_codes,
)
from dlfb_localization.runs import RunConfig, load_run, train_run
from dlfb_localization.train import compute_losses

TINY = tiny.CYTOSELF


def test_split_quantizer_snaps_every_subvector_to_the_shared_codebook():
    quantizer = VectorQuantizer(16, 4, 0.25, num_splits=3)
    inputs = jax.random.normal(jax.random.key(0), (2, 3, 3, 12))
    params = quantizer.init(jax.random.key(1), inputs)
    out = quantizer.apply(params, inputs)
    codebook = params["params"]["codebook"]
    pieces = inputs.reshape(2, 3, 3, 3, 4)
    assert out.indices.shape == (2, 3, 3, 3)
    np.testing.assert_array_equal(out.indices, find_nearest_codes(pieces, codebook))
    np.testing.assert_allclose(
        out.quantized.reshape(2, 3, 3, 3, 4), codebook.T[out.indices], atol=1e-6
    )
    assert len(np.unique(out.indices)) > 3  # the sub-vectors choose differently
    with pytest.raises(ValueError, match="12 channels"):
        quantizer.apply(params, inputs[..., :8])


@pytest.fixture(scope="module")
def outputs_and_params():
    model = CytoselfModel(**TINY)
    images = jax.random.uniform(jax.random.key(0), (4, 16, 16, 2))
    init = jax.jit(model.init, static_argnames="is_training")
    params = init(jax.random.key(1), images, is_training=False)["params"]
    return model, params, images


def test_full_model_has_two_levels_two_heads_and_cytoself_loss(outputs_and_params):
    model, params, images = outputs_and_params
    batch = {"images": images, "labels": jnp.array([0, 1, 2, 4])}

    @jax.jit
    def losses_and_grads(params, weight):
        def total(params):
            outputs = model.apply({"params": params}, images, False)
            values = compute_losses(outputs, batch, weight)
            return values["total_loss"], (values, outputs)

        grads, (values, outputs) = jax.grad(total, has_aux=True)(params)
        return values, outputs, grads

    values, outputs, grads = losses_and_grads(params, jnp.float32(1.0))
    assert outputs.decoded.shape == images.shape
    assert outputs.vq_local.indices.shape == (4, 4, 4)  # 16 / 4
    assert outputs.vq_global.indices.shape == (4, 1, 1, 3)  # 4 -> 2 -> 1 -> 1
    assert outputs.logits_local.shape == outputs.logits_global.shape == (4, 5)
    expected = (
        values["recon_loss"]
        + values["global_recon_loss"]
        + values["codebook_loss_local"]
        + values["codebook_loss_global"]
        + values["commitment_loss_local"]
        + values["commitment_loss_global"]
        + values["classification_loss_local"]
        + values["classification_loss_global"]
    )
    np.testing.assert_allclose(values["total_loss"], expected, rtol=1e-6)
    # The global decoder's output is compared with the local encoder's.
    np.testing.assert_allclose(
        values["global_recon_loss"],
        jnp.mean(jnp.square(outputs.local_from_global - outputs.local_latents)),
        rtol=1e-6,
    )
    # The image loss is divided by the data's variance. Up to float32
    # rounding: the two divisions round differently (they agreed to the bit at
    # XLA's optimization level 0, not at level 2).
    halved = compute_losses(outputs._replace(data_variance=0.5), batch, 1.0)
    np.testing.assert_allclose(
        halved["recon_loss"], 2 * values["recon_loss"], rtol=1e-6
    )
    for head in ("head_local", "head_global"):
        assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads[head]))
    # Without the classification weight, neither head gets a gradient.
    _, _, grads = losses_and_grads(params, jnp.float32(0.0))
    for head in ("head_local", "head_global"):
        assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads[head]))


def test_per_level_embeddings_count_every_position(outputs_and_params):
    model, params, images = outputs_and_params
    apply = jax.jit(model.apply, static_argnames="method", static_argnums=2)
    summary = apply({"params": params}, images, method="summarise_frames")
    assert summary["frame_histograms"].shape == (4, 16)
    np.testing.assert_array_equal(summary["frame_histograms"].sum(1), 16)
    np.testing.assert_array_equal(summary["frame_histograms_global"].sum(1), 3)
    assert summary["frame_vectors_global"].shape == (4, 8)
    indices = apply({"params": params}, images, "global", method="get_encoding_indices")
    counts = np.stack([np.bincount(np.ravel(i), minlength=16) for i in indices])
    np.testing.assert_array_equal(counts, summary["frame_histograms_global"])


# --- the codebook switches, on fixed encoder outputs --------------------------
# Sixteen tight clusters far from a fresh codebook: the quantizer's situation at
# the start of training, when encoder outputs and codes have unrelated scales.
D, K = 4, 16
_rng = np.random.default_rng(0)
CLUSTERED = jnp.asarray(
    (3 * _rng.normal(size=(K, 1, D)) + 0.1 * _rng.normal(size=(K, 64, D))).reshape(
        -1, D
    ),
    jnp.float32,
)
FRESH_CODEBOOK = jax.random.uniform(jax.random.key(0), (D, K), minval=-0.9, maxval=0.9)


def _used_fraction(codebook) -> float:
    indices = find_nearest_codes(CLUSTERED, codebook)
    return float(compute_code_usage(indices, K).used_fraction)


def _run_codebook_updates(options: CodebookOptions, steps: int = 50):
    @jax.jit
    def step(codebook, state, i):
        indices = find_nearest_codes(CLUSTERED, codebook)
        key = jax.random.fold_in(jax.random.key(1), i)
        return update_codebook(codebook, state, CLUSTERED, indices, options, key)

    codebook, state = FRESH_CODEBOOK, init_codebook_state(FRESH_CODEBOOK)
    for i in range(steps):
        codebook, state = step(codebook, state, i)
    return codebook


def _run_gradient_updates(steps: int = 50):
    tx = optax.adam(1e-3)  # the chapter's optimizer

    @jax.jit
    def step(codebook, opt_state):
        def loss(codebook):
            codes = lookup_codes(find_nearest_codes(CLUSTERED, codebook), codebook)
            return compute_codebook_loss(CLUSTERED, codes)

        updates, opt_state = tx.update(jax.grad(loss)(codebook), opt_state)
        return optax.apply_updates(codebook, updates), opt_state

    codebook, opt_state = FRESH_CODEBOOK, tx.init(FRESH_CODEBOOK)
    for _ in range(steps):
        codebook, opt_state = step(codebook, opt_state)
    return codebook


def test_ema_codebook_uses_more_codes_than_gradient_descent():
    start = _used_fraction(FRESH_CODEBOOK)
    by_gradient = _used_fraction(_run_gradient_updates())
    by_ema = _used_fraction(_run_codebook_updates(CodebookOptions(ema_decay=0.9)))
    # Moving averages carry each chosen code onto its clusters' mean within a
    # few steps, which frees clusters it was shadowing for other codes; Adam at
    # 1e-3 has barely moved the codes.
    assert start < 0.8 and by_gradient == start
    assert by_ema > by_gradient + 0.1


def test_dead_code_restart_brings_every_code_into_use():
    ema = CodebookOptions(ema_decay=0.9)
    without = _used_fraction(_run_codebook_updates(ema))
    restarted = CodebookOptions(ema_decay=0.9, restart_dead_codes=True)
    assert without < 0.9
    assert _used_fraction(_run_codebook_updates(restarted)) == 1.0


def test_restart_moves_only_codes_whose_use_fell_below_the_threshold():
    options = CodebookOptions(restart_dead_codes=True, dead_code_threshold=0.5)
    state = init_codebook_state(FRESH_CODEBOOK)
    state["usage"] = state["usage"].at[:3].set(0.0)  # three dead codes
    indices = find_nearest_codes(CLUSTERED, FRESH_CODEBOOK)
    codebook, new_state = update_codebook(
        FRESH_CODEBOOK, state, CLUSTERED, indices, options, jax.random.key(0)
    )
    moved = np.flatnonzero(np.any(np.asarray(codebook != FRESH_CODEBOOK), axis=0))
    np.testing.assert_array_equal(moved, [0, 1, 2])
    # Moved onto encoder outputs, and given a fresh start.
    distances = np.min(
        np.linalg.norm(CLUSTERED[:, None] - codebook.T[None, :3], axis=-1), axis=0
    )
    np.testing.assert_allclose(distances, 0, atol=1e-5)
    np.testing.assert_allclose(new_state["usage"][:3], 1 / K)


def test_kmeans_initialisation_starts_with_more_codes_in_use():
    model = LocalizationModel(
        num_classes=2,
        embedding_dim=8,
        num_embeddings=64,
        commitment_cost=0.25,
        dropout_rate=0.0,
        classification_head_layers=1,
    )
    rng = np.random.default_rng(0)
    images = rng.random((16, 16, 16, 1), dtype=np.float32)
    tx = optax.adam(1e-3)

    def perplexity(model, **kwargs):
        state = model.create_train_state(jax.random.key(0), images[:1], tx, **kwargs)
        apply = jax.jit(state.apply_fn, static_argnames="method")
        indices = apply({"params": state.params}, images, method="get_encoding_indices")
        return float(compute_code_usage(indices, 64).perplexity)

    random_start = perplexity(model)
    kmeans = model.clone(codebook=CodebookOptions(kmeans_init=True))
    # Every code starts at a centroid of the encoder's outputs, so more codes
    # are chosen (41.5 -> 49.6 of 64 here), none far from the data.
    assert perplexity(kmeans, init_images=images) > 1.1 * random_start
    with pytest.raises(ValueError, match="init_images"):
        perplexity(kmeans)


def test_codebook_options_reject_bad_values():
    with pytest.raises(ValueError, match="ema_decay"):
        CodebookOptions(ema_decay=1.0)
    with pytest.raises(ValueError, match="dead_code_threshold"):
        CodebookOptions(dead_code_threshold=0.0)
    with pytest.raises(ValueError, match="global_splits"):
        CytoselfModel(**{**TINY, "global_splits": 0})
    with pytest.raises(ValueError, match="model"):
        RunConfig(data="x", model="cytoself2")


# --- a full run: train, resume, embed, evaluate --------------------------------


def test_full_model_run_with_every_codebook_switch(tiny_release, tmp_path, monkeypatch):
    path, _, _ = tiny_release
    # test_evaluate covers the cluster scores; skip their five UMAPs here.
    monkeypatch.setattr(evaluate_module, "_UMAP_MIN_FRAMES", 10**6)
    config = RunConfig(
        data=str(path),
        channels=(0, 1),
        model="cytoself",
        embedding_dim=8,
        num_embeddings=16,
        global_splits=3,
        classification_head_layers=2,
        batch_size=8,
        num_epochs=1,
        ema_decay=0.9,
        restart_dead_codes=True,
        kmeans_init=True,
    )
    run = train_run(config, tmp_path / "run", progress=False)
    state = run.state
    assert isinstance(state, ModelState)
    assert int(state.step) > 0
    # The EMA codebook is the moving averages' quotient (no gradient moved it).
    for name in ("vq_local", "vq_global"):
        moving = state.collections["codebook_stats"][name]
        assert float(jnp.max(jnp.abs(moving["count"] - 1))) > 0
        total = jnp.sum(moving["count"])
        sizes = (moving["count"] + 1e-5) / (total + K * 1e-5) * total
        np.testing.assert_allclose(
            state.params[name]["codebook"], moving["sum"] / sizes, rtol=1e-4
        )
    train_metrics = run.metrics["train"]
    for name in ("perplexity_local", "perplexity_global", "global_recon_loss"):
        assert np.isfinite(train_metrics[name][-1]["mean"])

    restored = load_run(tmp_path / "run")
    for name in ("vq_local", "vq_global"):
        np.testing.assert_array_equal(
            restored.state.collections["codebook_stats"][name]["usage"],
            state.collections["codebook_stats"][name]["usage"],
        )

    split = DatasetBuilder(path, channels=(0, 1)).build(
        rng=0, splits={"evaluation": 1.0}
    )["evaluation"]
    result = evaluate(state, split, batch_size=16)
    protein = result["knn"]["protein"]["all"]
    assert {"global_codebook_histogram", "global_mean_quantized"} <= set(protein)
    # The probe scores every embedding k-NN does, both levels' included.
    assert set(result["probe"]) == set(protein) - {"majority_class"}
    assert 1 <= result["codebook_global"]["perplexity"] <= 16
    assert result["reconstruction_mse"] > 0
