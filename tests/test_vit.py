"""The SubCell-style ViT family's core: pooling, masking, the MAE loss, the
contrastive losses against NumPy references, the views, the P x K sampler,
and a few training steps that lower SubCell's objective."""

import functools

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import pytest

from dlfb_localization.dataset import Dataset
from dlfb_localization.dataset.builder import DatasetBuilder
from dlfb_localization.dataset.protein_batches import (
    iterate_protein_batches,
    plan_protein_batches,
)
from dlfb_localization.inference import (
    mae_reconstructions,
    reconstructs_masked_patches,
)
from dlfb_localization.inspect.mae import show_mae_reconstructions
from dlfb_localization.model.contrastive import (
    OBJECTIVES,
    AugmentOptions,
    Objective,
    augment_batch,
    combine_objectives,
    nt_xent_loss,
    supervised_contrastive_loss,
)
from dlfb_localization.model.group_conv import d4_apply
from dlfb_localization.model.vit import (
    AUGMENT_STREAM,
    GatedAttentionPooling,
    TransformerSize,
    ViTModel,
    ViTSize,
    compute_reconstruction_loss,
    count_kept,
    denormalise_patches,
    normalise_patches,
    patchify,
    random_masking,
    unpatchify,
)

# The tests' ViT: 16x16 crops, patch 4 (16 tokens), width 16, one block.
TINY = ViTSize(
    encoder=TransformerSize(width=16, depth=1, num_heads=2, mlp_dim=32),
    decoder=TransformerSize(width=16, depth=1, num_heads=2, mlp_dim=32),
    projector=(32, 16),
)


# --- pooling -----------------------------------------------------------------


def _numpy_gated_pooling(params, tokens):
    def dense(name, x):
        return x @ np.asarray(params[name]["kernel"]) + np.asarray(params[name]["bias"])

    hidden = np.tanh(dense("tanh", tokens)) / (1 + np.exp(-dense("gate", tokens)))
    scores = dense("scores", hidden)  # [b, t, heads]
    weights = np.exp(scores - scores.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    pooled = [
        np.sum(weights[:, :, h : h + 1] * tokens, axis=1)
        for h in range(scores.shape[-1])
    ]
    return np.concatenate(pooled, axis=-1), weights


def test_gated_pooling_weights_sum_to_one_and_pool_the_tokens():
    tokens = np.asarray(
        jax.random.normal(jax.random.key(0), (3, 5, 8)), dtype=np.float32
    )
    pooling = GatedAttentionPooling(num_heads=2)
    params = pooling.init(jax.random.key(1), tokens)["params"]
    pooled, weights = pooling.apply({"params": params}, tokens)

    assert pooled.shape == (3, 2 * 8)
    assert weights.shape == (3, 5, 2)
    np.testing.assert_allclose(np.sum(weights, axis=1), 1.0, rtol=1e-6)
    # The two heads look at the tokens differently (not a fixed average).
    assert np.abs(np.asarray(weights[..., 0] - weights[..., 1])).max() > 1e-3
    expected_pooled, expected_weights = _numpy_gated_pooling(params, tokens)
    np.testing.assert_allclose(weights, expected_weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pooled, expected_pooled, rtol=1e-5, atol=1e-5)
    # Head h's half of the embedding is its weighted sum of the tokens.
    for h in range(2):
        manual = np.einsum("bt,btd->bd", np.asarray(weights[..., h]), tokens)
        np.testing.assert_allclose(pooled[:, 8 * h : 8 * (h + 1)], manual, rtol=1e-5)


# --- patches, masking and the MAE loss ----------------------------------------


def test_patchify_cuts_row_major_patches_and_unpatchify_inverts_it():
    images = jax.random.uniform(jax.random.key(0), (2, 8, 12, 3))
    patches = patchify(images, 4)
    assert patches.shape == (2, 6, 4 * 4 * 3)
    # Patch 1 is the top row's second patch.
    np.testing.assert_array_equal(patches[:, 1], images[:, :4, 4:8].reshape(2, -1))
    np.testing.assert_array_equal(unpatchify(patches, 4, (2, 3)), images)
    with pytest.raises(ValueError, match="patch_size 5 must divide"):
        patchify(images, 5)


@pytest.mark.parametrize(
    ("n_tokens", "mask_ratio", "n_keep"),
    [(16, 0.25, 12), (16, 0.5, 8), (100, 0.25, 75), (100, 0.75, 25), (10, 0.33, 7)],
)
def test_masking_keeps_exactly_the_requested_share(n_tokens, mask_ratio, n_keep):
    assert count_kept(n_tokens, mask_ratio) == n_keep
    keep, mask = random_masking(jax.random.key(3), 6, n_tokens, mask_ratio)
    keep, mask = np.asarray(keep), np.asarray(mask)
    assert keep.shape == (6, n_keep)
    for row in range(6):
        assert len(np.unique(keep[row])) == n_keep
        assert mask[row, keep[row]].sum() == 0  # kept patches are not masked
    np.testing.assert_array_equal(mask.sum(axis=1), n_tokens - n_keep)
    # Each image draws its own mask; the same key draws the same masks.
    assert len({tuple(row) for row in keep}) > 1
    again, _ = random_masking(jax.random.key(3), 6, n_tokens, mask_ratio)
    np.testing.assert_array_equal(again, keep)


def test_reconstruction_loss_counts_only_masked_patches():
    rng = np.random.default_rng(0)
    predictions = rng.normal(size=(2, 6, 5)).astype(np.float32)
    patches = rng.normal(size=(2, 6, 5)).astype(np.float32)
    targets = normalise_patches(jnp.asarray(patches))
    np.testing.assert_allclose(np.mean(targets, -1), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.var(targets, -1), 1.0, rtol=1e-4)
    mask = np.array([[1, 0, 1, 0, 0, 1], [0, 0, 1, 1, 0, 0]], np.float32)
    loss = compute_reconstruction_loss(predictions, targets, mask)

    per_patch = np.mean((predictions - np.asarray(targets)) ** 2, axis=-1)
    np.testing.assert_allclose(loss, per_patch[mask == 1].mean(), rtol=1e-6)
    changed_kept = predictions.copy()
    changed_kept[0, 1] += 10.0  # patch 1 of image 0 is kept
    assert compute_reconstruction_loss(changed_kept, targets, mask) == loss
    changed_masked = predictions.copy()
    changed_masked[0, 0] += 10.0
    assert compute_reconstruction_loss(changed_masked, targets, mask) > loss


# --- contrastive losses --------------------------------------------------------


def _normalise(z):
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def _numpy_nt_xent(z1, z2, temperature):
    z = _normalise(np.concatenate([z1, z2]).astype(np.float64))
    n = len(z1)
    sim = z @ z.T / temperature
    losses = []
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        others = [sim[i, k] for k in range(2 * n) if k != i]
        losses.append(-(sim[i, j] - np.log(np.sum(np.exp(others)))))
    return np.mean(losses)


def _numpy_supcon(z, ids, temperature):
    z = _normalise(z.astype(np.float64))
    sim = z @ z.T / temperature
    losses = []
    for i in range(len(z)):
        positives = [p for p in range(len(z)) if p != i and ids[p] == ids[i]]
        if not positives:
            continue
        denominator = np.log(sum(np.exp(sim[i, a]) for a in range(len(z)) if a != i))
        losses.append(-np.mean([sim[i, p] - denominator for p in positives]))
    return np.mean(losses)


def test_nt_xent_equals_a_numpy_reference():
    rng = np.random.default_rng(1)
    z1, z2 = rng.normal(size=(2, 6, 5)).astype(np.float32)
    for temperature in (0.1, 0.5):
        np.testing.assert_allclose(
            nt_xent_loss(z1, z2, temperature),
            _numpy_nt_xent(z1, z2, temperature),
            rtol=1e-5,
        )
    # The positive is the other view of the same crop: views that agree give a
    # lower loss than the same views paired with the wrong crops.
    close = z1 + 0.05 * rng.normal(size=z1.shape).astype(np.float32)
    assert nt_xent_loss(z1, close) < nt_xent_loss(z1, close[::-1])


def test_supervised_contrastive_equals_a_numpy_reference():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(10, 4)).astype(np.float32)
    ids = np.array([3, 3, 7, 7, 7, 1, 1, 9, 3, 5])  # protein 5 has no positive
    for temperature in (0.1, 0.7):
        np.testing.assert_allclose(
            supervised_contrastive_loss(z, ids, temperature),
            _numpy_supcon(z, ids, temperature),
            rtol=1e-5,
        )
    permuted = rng.permutation(ids)
    np.testing.assert_allclose(
        supervised_contrastive_loss(z, permuted),
        _numpy_supcon(z, permuted, 0.1),
        rtol=1e-5,
    )
    assert not np.isclose(
        supervised_contrastive_loss(z, permuted), supervised_contrastive_loss(z, ids)
    )


def test_supervised_contrastive_positives_are_the_same_protein_only():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(8, 4)).astype(np.float32)
    # Only crops 0 and 1 share a protein, so only they are anchors.
    ids = np.array([0, 0, 1, 2, 3, 4, 5, 6])
    loss = supervised_contrastive_loss(z, ids)
    # Renaming proteins changes nothing; only equality of ids matters.
    assert np.isclose(supervised_contrastive_loss(z, ids * 10 + 5), loss, rtol=1e-6)
    # Another protein's crop (2) made to look like the pair is a harder
    # negative: the loss rises. The pair's crops made alike lower it.
    toward_negative = z.copy()
    toward_negative[2] = _normalise(z[:2]).sum(axis=0)
    assert supervised_contrastive_loss(toward_negative, ids) > loss
    toward_positive = z.copy()
    toward_positive[1] = z[0]
    assert supervised_contrastive_loss(toward_positive, ids) < loss
    # Calling crop 2 the pair's protein makes it a positive of both.
    as_positive = supervised_contrastive_loss(
        toward_negative, np.where(ids == 1, 0, ids)
    )
    assert as_positive < supervised_contrastive_loss(toward_negative, ids)
    # With every crop its own protein there are no positives: loss 0.
    assert supervised_contrastive_loss(z, np.arange(8)) == 0.0


def test_objectives_switch_tasks_off_and_sum_with_their_weights():
    assert OBJECTIVES["subcell"] == Objective(1.0, 1.0, 0.1, mask_ratio=0.25)
    rng = np.random.default_rng(4)
    projections = jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32)
    ids = jnp.array([0, 0, 1, 1])
    recon = jnp.float32(0.7)
    subcell = combine_objectives(OBJECTIVES["subcell"], recon, projections, ids)
    expected = 0.7 + subcell["nt_xent_loss"] + 0.1 * subcell["supcon_loss"]
    np.testing.assert_allclose(subcell["total_loss"], expected, rtol=1e-6)
    np.testing.assert_allclose(
        subcell["supcon_loss"],
        _numpy_supcon(np.asarray(projections).reshape(8, 3), np.tile(ids, 2), 0.1),
        rtol=1e-5,
    )
    mae = combine_objectives(OBJECTIVES["mae"], recon)
    assert set(mae) == {"total_loss", "recon_loss"}
    assert mae["total_loss"] == recon
    protein = combine_objectives(OBJECTIVES["protein"], None, projections, ids)
    assert set(protein) == {"total_loss", "supcon_loss"}
    with pytest.raises(ValueError, match="at least one > 0"):
        Objective(0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="needs masked patches"):
        Objective(mask_ratio=0.0)


# --- views ----------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=2)
def _augment(rng, images, options):
    return augment_batch(rng, images, options)


QUARTER_TURNS_ONLY = AugmentOptions(
    d4=True, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), gain=0.0, gamma=0.0
)


def test_views_are_reproducible_from_the_key_and_quarter_turns_are_exact():
    images = jax.random.uniform(jax.random.key(0), (16, 8, 8, 2))
    options = AugmentOptions(gain=0.2)
    first = _augment(jax.random.key(5), images, options)
    np.testing.assert_array_equal(first, _augment(jax.random.key(5), images, options))
    assert not np.allclose(first, _augment(jax.random.key(6), images, options))
    assert not np.allclose(first, images)

    turned = np.asarray(_augment(jax.random.key(7), images, QUARTER_TURNS_ONLY))
    elements = []
    for image, view in zip(np.asarray(images), turned, strict=True):
        matches = [
            k
            for k in range(8)
            if np.array_equal(np.asarray(d4_apply(image, k, axes=(0, 1))), view)
        ]
        assert matches, "a view is not an exact quarter turn or flip of its crop"
        elements.append(matches[0])
    assert len(set(elements)) > 2


def test_resized_crop_magnifies_and_intensity_jitter_is_per_channel():
    ramp = jnp.broadcast_to(jnp.arange(16, dtype=jnp.float32)[None, :], (16, 16))
    images = jnp.broadcast_to(ramp[None, ..., None], (4, 16, 16, 2))
    crop = AugmentOptions(
        d4=False, crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0), gain=0.0, gamma=0.0
    )
    views = np.asarray(_augment(jax.random.key(1), images, crop))
    # A quarter of the area is an 8x8 region shown at 16x16: the ramp's slope
    # halves, and the rows (constant along the ramp's other axis) stay equal.
    np.testing.assert_allclose(np.diff(views[:, :, 1:-1], axis=2), 0.5, atol=1e-5)
    np.testing.assert_allclose(
        views, np.broadcast_to(views[:, :1], views.shape), rtol=1e-6
    )
    assert np.ptp(views[:, 0, 0, 0]) > 0.1  # each crop its own region

    positive = jax.random.uniform(jax.random.key(2), (4, 8, 8, 3)) + 0.5
    gain = AugmentOptions(
        d4=False, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), gain=0.3, gamma=0.0
    )
    ratio = np.asarray(_augment(jax.random.key(3), positive, gain) / positive)
    factors = ratio[:, 0, 0, :]  # one factor per image and channel
    np.testing.assert_allclose(
        ratio, np.broadcast_to(factors[:, None, None, :], ratio.shape), rtol=1e-5
    )
    assert np.all((factors >= 0.7) & (factors <= 1.3))
    assert np.ptp(factors[0]) > 1e-3  # channels are scaled independently

    gamma = AugmentOptions(
        d4=False, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), gain=0.0, gamma=0.5
    )
    contrasted = np.asarray(_augment(jax.random.key(4), positive, gamma))
    flat, original = (
        contrasted.reshape(4, -1, 3),
        np.asarray(positive).reshape(4, -1, 3),
    )
    # A gamma curve per channel: range and pixel order kept, values moved.
    np.testing.assert_allclose(flat.min(1), original.min(1), rtol=1e-5)
    np.testing.assert_allclose(flat.max(1), original.max(1), rtol=1e-5)
    for image in range(4):
        for channel in range(3):
            order = np.argsort(original[image, :, channel])
            assert np.all(np.diff(flat[image, order, channel]) >= -1e-6)
    assert np.abs(flat - original).max() > 1e-2


# --- the P x K sampler -------------------------------------------------------------


@pytest.fixture(scope="module")
def release_split(module_tiny_release, tmp_path_factory):
    """The tiny release (6 proteins x 3 fields x 4 crops) as one split, read
    from its memory-mapped cache."""
    path, _, _ = module_tiny_release
    builder = DatasetBuilder(path, cache_dir=tmp_path_factory.mktemp("vit_cache"))
    return builder.build(0, {"train": 1.0})["train"]


def test_sampler_draws_k_crops_of_p_proteins_without_repeats(release_split):
    lookup = release_split.labels.lookup.set_index("frame_id")
    frames = release_split.images.frames
    batches = list(iterate_protein_batches(release_split, 3, 4, rng=0))
    # 6 proteins x 3 groups of 4 (one per field) make at most 6 batches of 3.
    assert 4 <= len(batches) <= 6
    seen = np.concatenate([batch["frame_ids"] for batch in batches])
    assert len(np.unique(seen)) == len(seen)
    for batch in batches:
        assert batch["images"].shape == (12, 16, 16, 1)
        assert batch["images"].dtype == np.float32
        np.testing.assert_array_equal(batch["images"], frames[batch["frame_ids"]])
        rows = lookup.loc[batch["frame_ids"]]
        np.testing.assert_array_equal(batch["labels"], rows["code"].to_numpy())
        proteins = rows["protein_id"].to_numpy().reshape(3, 4)
        assert np.all(proteins == proteins[:, :1])  # K crops of one protein
        assert len(np.unique(proteins[:, 0])) == 3  # P distinct proteins
        # Every field has 4 crops, so each protein's 4 come from one field.
        fields = rows["fov_id"].to_numpy().reshape(3, 4)
        assert np.all(fields == fields[:, :1])

    again = list(iterate_protein_batches(release_split, 3, 4, rng=0))
    for a, b in zip(batches, again, strict=True):
        np.testing.assert_array_equal(a["frame_ids"], b["frame_ids"])
    other = list(iterate_protein_batches(release_split, 3, 4, rng=1))
    assert not np.array_equal(seen, np.concatenate([b["frame_ids"] for b in other]))


def test_sampler_fills_groups_across_fields_when_one_is_too_small():
    # Protein 0: fields of 6 and 2 crops; protein 1: one field of 8; K = 4.
    protein_ids = np.array([0] * 8 + [1] * 8)
    fov_ids = np.array([10] * 6 + [11] * 2 + [20] * 8)
    plan = plan_protein_batches(protein_ids, fov_ids, 2, 4, rng=3)
    assert plan.shape == (2, 8)
    assert len(np.unique(plan)) == 16  # every crop once
    groups = plan.reshape(-1, 4)
    group_fields = [set(fov_ids[g]) for g in groups if protein_ids[g[0]] == 0]
    # One group from the field of 6, the rest (2 + 2) across both fields.
    assert sorted(len(fields) for fields in group_fields) == [1, 2]


def test_sampler_refuses_impossible_requests(release_split):
    with pytest.raises(ValueError, match="must be >= 1"):
        next(iterate_protein_batches(release_split, 0, 4, rng=0))
    with pytest.raises(ValueError, match="must be >= 1"):
        next(iterate_protein_batches(release_split, 2, 0, rng=0))
    with pytest.raises(ValueError, match="only 6 of the split's 6 proteins"):
        next(iterate_protein_batches(release_split, 7, 4, rng=0))
    with pytest.raises(ValueError, match="only 0 of"):
        next(iterate_protein_batches(release_split, 2, 13, rng=0))


# --- the model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_batch():
    """8 two-channel 16x16 crops, 2 of each of 4 proteins, each protein with
    its own pattern."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 2).astype(np.int32)
    grid = np.linspace(0, 2 * np.pi, 16)
    patterns = np.stack(
        [np.sin((p + 1) * grid)[:, None] * np.cos(grid)[None, :] for p in range(4)]
    )
    protein = patterns[labels] + 0.1 * rng.normal(size=(8, 16, 16))
    nucleus = rng.normal(size=(8, 16, 16))
    images = np.stack([protein, nucleus], axis=-1).astype(np.float32)
    return Dataset.from_arrays(images, labels, fov_ids=labels // 2)


def _make_step(tx):
    @jax.jit
    def step(state, images, labels, rng):
        def loss_fn(params):
            outputs = state.apply_fn(
                {"params": params},
                images,
                is_training=True,
                rngs={AUGMENT_STREAM: jax.random.fold_in(rng, state.step)},
                method="compute_outputs",
            )
            losses = outputs.losses(labels)
            aux = (losses, outputs.metrics(labels), outputs.mask)
            return losses["total_loss"], aux

        (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads), *aux

    return step


def test_tiny_vit_steps_lower_the_subcell_loss_and_embed(tiny_batch):
    model = ViTModel(size=TINY, patch_size=4, objective=OBJECTIVES["subcell"])
    tx = optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.05)
    images = jnp.asarray(tiny_batch.images.frames)
    labels = jnp.asarray(tiny_batch.labels.codes)
    state = model.create_train_state(jax.random.key(0), images[:1], tx)
    step = _make_step(tx)

    history = []
    for _ in range(40):
        state, losses, metrics, mask = step(state, images, labels, jax.random.key(1))
        history.append({name: float(value) for name, value in losses.items()})
    assert set(history[0]) == {
        "total_loss",
        "recon_loss",
        "nt_xent_loss",
        "supcon_loss",
    }
    # Two views of 8 crops, 16 patches each, a quarter masked: 4 per view.
    assert mask.shape == (16, 16)
    np.testing.assert_array_equal(np.asarray(mask).sum(axis=1), 4)
    # Pooling has not collapsed onto single tokens, nor embeddings onto one
    # direction.
    assert 0.5 < metrics["attention_entropy"] <= 1.0
    assert metrics["embedding_spread"] > 0.05
    first = np.mean([h["total_loss"] for h in history[:5]])
    last = np.mean([h["total_loss"] for h in history[-5:]])
    assert last < 0.8 * first, (first, last)

    @jax.jit
    def embed(params, x):
        variables = {"params": params}
        return (
            state.apply_fn(variables, x, method="summarise_frames")["frame_pooled"],
            state.apply_fn(variables, x, method="attention_maps"),
        )

    vectors, maps = embed(state.params, images)
    assert maps.shape == (8, 4, 4, 2)  # the 4x4 patch grid, per pooling head
    np.testing.assert_allclose(np.sum(maps, axis=(1, 2)), 1.0, rtol=1e-5)
    assert vectors.shape == (8, model.embedding_dim) == (8, 2 * 16)
    # Crops of the same protein end up closer than crops of different ones.
    z = np.asarray(vectors) / np.linalg.norm(vectors, axis=1, keepdims=True)
    similarity = z @ z.T
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~np.eye(8, dtype=bool)
    assert similarity[same & off_diagonal].mean() > similarity[~same].mean()


@pytest.mark.parametrize(
    ("objective", "parts", "loss_names"),
    [
        ("mae", {"encoder", "pooling", "decoder"}, {"total_loss", "recon_loss"}),
        ("protein", {"encoder", "pooling", "projector"}, {"total_loss", "supcon_loss"}),
    ],
)
def test_the_objective_decides_which_parts_exist(objective, parts, loss_names):
    model = ViTModel(size=TINY, patch_size=4, objective=OBJECTIVES[objective])
    images = jnp.zeros((4, 16, 16, 2))
    rngs = {"params": jax.random.key(0), AUGMENT_STREAM: jax.random.key(1)}
    # Shapes only (no compilation): what init builds, what evaluation returns.
    params = jax.eval_shape(
        lambda: model.init(rngs, images, is_training=True, method="compute_outputs")
    )["params"]
    assert set(params) == parts
    # Evaluation draws masks only when something is masked: "protein" needs
    # no key at all.
    eval_rngs = {AUGMENT_STREAM: jax.random.key(2)} if objective == "mae" else None

    def evaluate(params):
        outputs = model.apply(
            {"params": params},
            images,
            is_training=False,
            rngs=eval_rngs,
            method="compute_outputs",
        )
        return outputs, outputs.losses(jnp.arange(4))

    outputs, losses = jax.eval_shape(evaluate, params)
    views = 1 if objective == "mae" else 2
    assert outputs.embeddings.shape == (views * 4, model.embedding_dim)
    kept = 8 if objective == "mae" else 16  # mask ratio 0.5 of 16 patches, or 0
    assert outputs.attention.shape == (views * 4, kept, 2)
    assert set(losses) == loss_names


# --- the MAE figure -------------------------------------------------------------


def test_denormalise_patches_inverts_normalise_patches():
    patches = jax.random.normal(jax.random.key(0), (2, 5, 12)) * 3.0 + 7.0
    restored = denormalise_patches(normalise_patches(patches), patches)
    np.testing.assert_allclose(restored, patches, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("objective", "n_masked"), [("mae", 8), ("subcell", 4)])
def test_mae_reconstructions_paste_predictions_into_the_kept_patches(
    tiny_batch, objective, n_masked
):
    model = ViTModel(size=TINY, patch_size=4, objective=OBJECTIVES[objective])
    images = np.asarray(tiny_batch.images.frames)
    state = model.create_train_state(jax.random.key(0), images[:1], optax.adam(1e-3))
    assert reconstructs_masked_patches(state)
    result = mae_reconstructions(state, images, rng=3)
    recon, mask = np.asarray(result.reconstructions), np.asarray(result.mask)
    assert recon.shape == images.shape and mask.shape == (8, 4, 4)
    # The model's mask ratio of the 16 patches (0.5, or SubCell's 0.25).
    np.testing.assert_array_equal(mask.sum(axis=(1, 2)), n_masked)
    hidden = np.repeat(np.repeat(mask, 4, 1), 4, 2)[..., None]
    hidden = np.broadcast_to(hidden, images.shape)
    np.testing.assert_array_equal(recon[~hidden], images[~hidden])  # exactly
    assert not np.allclose(recon[hidden], images[hidden])

    # The masks are the model's own (its first view's), and the masked
    # patches its predictions, each on its patch's scale in the standardised
    # crop, then on the crop's.
    # One jitted call: run op by op, this took some 130 compilations.
    @jax.jit
    def model_reconstructions(params, images):
        outputs = model.apply(
            {"params": params},
            images,
            is_training=False,
            rngs={AUGMENT_STREAM: jax.random.key(3)},
            method="compute_outputs",
        )
        mean = images.mean(axis=(1, 2), keepdims=True)
        std = images.std(axis=(1, 2), keepdims=True)
        view = (images - mean) / std
        patches = denormalise_patches(outputs.predictions[:8], patchify(view, 4))
        return outputs.mask[:8], unpatchify(patches, 4, (4, 4)) * std + mean

    model_mask, expected = jax.device_get(model_reconstructions(state.params, images))
    np.testing.assert_array_equal(model_mask.reshape(mask.shape), mask)
    np.testing.assert_allclose(recon[hidden], expected[hidden], rtol=1e-4, atol=1e-4)
    again = mae_reconstructions(state, images, rng=3)
    np.testing.assert_array_equal(np.asarray(again.mask), mask)
    other = mae_reconstructions(state, images, rng=4)
    assert not np.array_equal(np.asarray(other.mask), mask)


def test_the_mae_figure_shows_three_panels_a_frame_and_only_for_reconstruction(
    tiny_batch,
):
    images = tiny_batch.images.frames[:1]
    state = ViTModel(
        size=TINY, patch_size=4, objective=OBJECTIVES["mae"]
    ).create_train_state(jax.random.key(0), images, optax.adam(1e-3))
    fig = show_mae_reconstructions(tiny_batch, state, n=4, rng=0, channel=1)
    assert len(fig.axes) == 4 * 3
    # The masked panel blanks half the patches; the other two show them all.
    masked = fig.axes[0].get_images()[0].get_array()
    assert np.ma.count_masked(masked) == 8 * 4 * 4
    assert np.ma.count_masked(fig.axes[2].get_images()[0].get_array()) == 0
    plt.close(fig)

    protein = ViTModel(
        size=TINY, patch_size=4, objective=OBJECTIVES["protein"]
    ).create_train_state(jax.random.key(0), images, optax.adam(1e-3))
    assert not reconstructs_masked_patches(protein)
    with pytest.raises(ValueError, match="does not reconstruct"):
        mae_reconstructions(protein, tiny_batch.images.frames)
