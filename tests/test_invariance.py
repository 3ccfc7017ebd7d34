"""Orientation invariance: D4 and rotations, augmentation in the train step, the
group-equivariant encoder, the invariance score, orbit pooling and alignment."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny

from dlfb_localization import checkpoint, evaluate
from dlfb_localization.cli import build_parser
from dlfb_localization.dataset import Dataset
from dlfb_localization.embeddings import get_frame_embeddings
from dlfb_localization.invariance import (
    align,
    d4_compose,
    d4_inverse,
    d4_orbit,
    d4_transform,
    invariance_score,
    orbit_pooled_embeddings,
    random_orientation,
    rotate,
)
from dlfb_localization.invariance import score as score_module
from dlfb_localization.model import Encoder, LocalizationModel
from dlfb_localization.model.group_conv import InvariantEncoder
from dlfb_localization.runs import RunConfig
from dlfb_localization.train import eval_step, train, train_step

SIZE = 16
TX = optax.adam(1e-3)


# One model object per encoder for the whole module: the jitted steps and
# embeddings compile once per model object.
MODELS = {
    name: LocalizationModel(
        **{**tiny.CHAPTER, "classification_head_layers": 1}, encoder_type=name
    )
    for name in ("residual", "d4")
}


def make_state(encoder_type: str, seed: int = 0):
    dummy_input = np.zeros((1, SIZE, SIZE, 1), np.float32)
    # XLA's own generator ("rbg") compiles the initialisation ~4x faster on
    # CPU than threefry, whose rounds are unrolled for every parameter.
    rng = jax.random.key(seed, impl="rbg")
    return MODELS[encoder_type].create_train_state(rng, dummy_input, TX)


def random_images(n: int, seed: int = 0, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).random((n, size, size, 1), dtype=np.float32)


@pytest.fixture(scope="module")
def states():
    return {name: make_state(name) for name in ("residual", "d4")}


# --- D4 and rotations -------------------------------------------------------


def test_d4_has_eight_distinct_elements_that_compose_and_invert():
    x = jnp.asarray(random_images(2, size=5))
    orbit = d4_orbit(x)
    flat = np.asarray(orbit).reshape(8, -1)
    assert len({row.tobytes() for row in flat}) == 8
    for a in range(8):
        np.testing.assert_array_equal(d4_transform(x, a), orbit[a])
        np.testing.assert_array_equal(
            d4_transform(d4_transform(x, a), d4_inverse(a)), x
        )
        for b in range(8):
            np.testing.assert_array_equal(
                d4_transform(d4_transform(x, b), a), orbit[d4_compose(a, b)]
            )
    # A quarter turn has order 4, a flip order 2, and they do not commute.
    assert d4_compose(1, 1) == 2 and d4_compose(4, 4) == 0
    assert d4_compose(1, 4) != d4_compose(4, 1)


def test_rotation_by_90_degrees_interpolates_to_rot90():
    x = jnp.asarray(random_images(3, seed=1))
    np.testing.assert_allclose(
        rotate(x, 90.0)[:, 1:-1, 1:-1], d4_transform(x, 1)[:, 1:-1, 1:-1], atol=1e-5
    )
    flipped = rotate(x, jnp.array([270.0, 0.0, 180.0]), jnp.array([True, True, False]))
    expected = jnp.stack(
        [d4_transform(x, 7)[0], d4_transform(x, 4)[1], d4_transform(x, 2)[2]]
    )
    np.testing.assert_allclose(flipped, expected, atol=1e-5)
    # 45 degrees is no pixel permutation: the image changes, its mean barely.
    turned = rotate(x, 45.0)
    assert float(jnp.abs(turned - x).mean()) > 0.1
    assert abs(float(turned.mean() - x.mean())) < 0.05
    # The corners are mirrored crop, not a fill value: a flat image stays flat.
    flat = rotate(jnp.full_like(x, 0.7), 45.0)
    np.testing.assert_allclose(flat, 0.7, atol=1e-6)


def test_random_orientation_is_one_d4_element_per_image_and_reproducible():
    x = jnp.asarray(random_images(16, seed=2))
    key = jax.random.key(3)
    y = random_orientation(key, x, "d4")
    np.testing.assert_array_equal(y, random_orientation(key, x, "d4"))
    orbit = np.asarray(d4_orbit(x))
    chosen = []
    for i in range(len(x)):
        matches = [k for k in range(8) if np.array_equal(orbit[k, i], y[i])]
        assert len(matches) == 1
        chosen += matches
    assert len(set(chosen)) > 3  # each image draws its own element
    turned = random_orientation(key, x, "rotate")
    assert not np.allclose(turned, random_orientation(jax.random.key(4), x, "rotate"))
    np.testing.assert_array_equal(random_orientation(key, x, "none"), x)
    with pytest.raises(ValueError, match="mode"):
        random_orientation(key, x, "shear")


# --- augmentation inside the train step -------------------------------------


def test_train_step_augments_the_batch_it_trains_on_with_a_reproducible_key(states):
    rng = jax.random.key(5)
    batch = {"images": random_images(8, seed=4), "labels": np.arange(8) % 4}
    weight = jnp.float32(1.0)
    state = states["residual"]

    def evaluate_on(images):  # no dropout: the forward pass of training
        metrics = eval_step(state, {**batch, "images": images}, weight)
        return {name: float(value) for name, value in metrics.items()}

    def augmented_step():
        # A copy: the step donates its state.
        fresh = jax.tree.map(jnp.copy, state)
        _, metrics = train_step(fresh, batch, rng, weight, 1, "d4")
        return {name: float(value) for name, value in metrics.items()}

    augmented = augmented_step()
    # The images the model should see: the documented key, at step 0.
    seen = random_orientation(
        jax.random.fold_in(jax.random.fold_in(rng, 0), 1_000_003),
        jnp.asarray(batch["images"]),
        "d4",
    )
    assert not np.array_equal(seen, batch["images"])
    by_hand, plain = evaluate_on(seen), evaluate_on(batch["images"])

    # A step's metrics are those of the images it trained on (before its
    # update): the transformed batch, not the plain one; and the same key
    # draws the same transforms again.
    for name in ("recon_loss", "commitment_loss", "classification_loss"):
        assert augmented[name] == pytest.approx(by_hand[name], rel=1e-5), name
    assert abs(augmented["recon_loss"] - plain["recon_loss"]) > 1e-3
    assert augmented == augmented_step()


def test_augment_is_validated_and_a_checkpoint_with_another_is_refused(
    states, tmp_path
):
    splits = {
        name: Dataset.from_arrays(random_images(8, seed=i), np.arange(8) % 4)
        for i, name in enumerate(("train", "valid"))
    }
    state, key = states["residual"], jax.random.key(7)
    arguments = dict(num_epochs=1, batch_size=8, classification_weight=1.0)
    with pytest.raises(ValueError, match="augment"):
        train(state, key, splits, **arguments, augment="flip")

    # A finished one-epoch run trained without augmentation.
    store = tmp_path / "run"
    config = checkpoint.build_run_config(
        state, key, splits, **arguments, eval_every=10, augment="none"
    )
    manager = checkpoint.open_manager(store)
    checkpoint.save_epoch(manager, state, 0, config, {"train": {}, "valid": {}})
    manager.close()

    with pytest.raises(checkpoint.ConfigMismatchError, match="augment: stored 'none'"):
        train(state, key, splits, **arguments, store_path=store, augment="d4")
    # The same settings restore it without training.
    restored, _ = train(state, key, splits, **arguments, store_path=store)
    jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)


def test_run_config_and_command_line_carry_augment_and_encoder(tmp_path):
    args = build_parser().parse_args(
        [
            *("train", "--data", str(tmp_path), "--store", str(tmp_path / "s")),
            *("--augment", "rotate", "--encoder", "d4"),
        ]
    )
    assert (args.augment, args.encoder) == ("rotate", "d4")
    assert RunConfig(data="x").augment == "none"
    with pytest.raises(ValueError, match="augment"):
        RunConfig(data="x", augment="d8")
    with pytest.raises(ValueError, match="encoder"):
        RunConfig(data="x", encoder="c4")
    with pytest.raises(ValueError, match="encoder_type"):
        MODELS["d4"].clone(encoder_type="c4")


# --- the invariant encoder --------------------------------------------------


@pytest.mark.parametrize("size", [16, 20])  # 20 -> 10 -> 5: an odd grid, as 100
def test_invariant_encoder_turns_its_latents_and_codes_with_the_image(states, size):
    x = jnp.asarray(random_images(2, seed=8, size=size))
    # The 8 transforms of both images as one batch, in one call.
    orbit = d4_orbit(x).reshape(16, size, size, 1)
    modules = {"d4": InvariantEncoder(8), "residual": Encoder(8)}
    for name in ("d4", "residual") if size == SIZE else ("d4",):
        # The models' encoders (any input size: no parameter depends on it).
        params = {"params": states[name].params["encoder"]}
        latents = jax.jit(modules[name].apply)(params, orbit)
        latents = np.asarray(latents).reshape(8, 2, size // 4, size // 4, 8)
        errors = [
            np.abs(latents[g] - d4_transform(latents[0], g)).max() for g in range(1, 8)
        ]
        scale = np.abs(latents).max()
        if name == "residual":  # the chapter's encoder is not equivariant
            assert min(errors) > 0.05 * scale
            continue
        assert max(errors) < 1e-5 * scale
        # The nearest codes turn with the grid, so histograms cannot change.
        codebook = np.asarray(states[name].params["vector_quantizer"]["codebook"])
        distances = np.square(latents[..., None] - codebook).sum(axis=-2)
        codes = distances.argmin(axis=-1)[..., None]
        assert len(np.unique(codes[0])) > 2
        for g in range(8):
            np.testing.assert_array_equal(codes[g], d4_transform(codes[0], g))


# --- invariance score and orbit pooling -------------------------------------


def test_score_uses_the_evaluations_distances():
    for name, metric in score_module.EMBEDDING_METRICS.items():
        assert evaluate.EMBEDDING_METRICS[name] == metric


def test_invariance_score_is_zero_on_d4_for_the_d4_encoder_only(states):
    images = random_images(24, seed=10)
    scores = {
        name: invariance_score(
            state, images, angles=(30.0,), num_pairs=200, seed=0, batch_size=8
        )
        for name, state in states.items()
    }
    for embedding in ("codebook_histogram", "mean_quantized"):
        invariant = scores["d4"][embedding]
        residual = scores["residual"][embedding]
        assert invariant["d4"] < 1e-6
        assert residual["d4"] > 0.2
        assert min(residual["d4_elements"].values()) > 0.05
        assert set(invariant["angles"]) == {"30"}
        assert invariant["pair_distance"] > 0
    assert scores["d4"] == invariance_score(
        states["d4"], images, angles=(30.0,), num_pairs=200, seed=0, batch_size=8
    )


def test_orbit_pooling_gives_a_crop_and_its_turned_copy_one_embedding(states):
    images = random_images(6, seed=11)
    turned = np.asarray(d4_transform(jnp.asarray(images), 3))
    split = Dataset.from_arrays(np.concatenate([images, turned]), np.arange(12) % 4)

    # The chapter's encoder is not invariant (see the score's test), its
    # orbit means are.
    pooled = orbit_pooled_embeddings(states["residual"], split, batch_size=8)
    np.testing.assert_array_equal(pooled["frame_ids"], np.arange(12))
    np.testing.assert_array_equal(
        pooled["frame_histograms"][:6], pooled["frame_histograms"][6:]
    )
    np.testing.assert_allclose(
        pooled["frame_vectors"][:6], pooled["frame_vectors"][6:], atol=1e-6
    )
    np.testing.assert_allclose(pooled["frame_histograms"].sum(1), 16)
    # ... and still tell different crops apart.
    assert not np.array_equal(
        pooled["frame_histograms"][:3], pooled["frame_histograms"][3:6]
    )
    # For the invariant model, pooling changes nothing: the same embeddings as
    # the evaluation's.
    invariant = orbit_pooled_embeddings(states["d4"], split, batch_size=8)
    evaluated = get_frame_embeddings(states["d4"], split, batch_size=8)
    np.testing.assert_array_equal(
        invariant["frame_histograms"], evaluated["frame_histograms"]
    )
    np.testing.assert_allclose(
        invariant["frame_vectors"], evaluated["frame_vectors"], atol=1e-6
    )


# --- alignment --------------------------------------------------------------


def render_blobs(blobs, size: int, angle: float, flip: bool) -> np.ndarray:
    """Anisotropic Gaussians, drawn flipped (x -> -x) then turned by `angle`
    degrees counter-clockwise (rows down) analytically, not by resampling."""
    centre = (size - 1) / 2
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) - centre
    theta = np.deg2rad(angle)
    turn = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    transform = turn @ np.diag([1.0, -1.0 if flip else 1.0])
    image = np.zeros((size, size))
    for cy, cx, sigma_long, sigma_short, phi, amplitude in blobs:
        axes = np.array([[np.cos(phi), -np.sin(phi)], [np.sin(phi), np.cos(phi)]])
        covariance = axes @ np.diag([sigma_long**2, sigma_short**2]) @ axes.T
        mean = transform @ np.array([cy, cx])
        precision = np.linalg.inv(transform @ covariance @ transform.T)
        d = np.stack([y - mean[0], x - mean[1]], axis=-1)
        image += amplitude * np.exp(
            -0.5 * np.einsum("...i,ij,...j->...", d, precision, d)
        )
    return image.astype(np.float32)


def test_alignment_recovers_angle_and_flip_within_two_degrees():
    rng = np.random.default_rng(12)
    cases = [(a, f) for a in (17.0, 73.0, 140.0, 251.0) for f in (False, True)]
    references, movings = [], []
    for angle, flip in cases:
        blobs = [
            (
                *rng.uniform(-10, 10, 2),
                *rng.uniform([5, 1.5], [8, 3]),
                *rng.uniform([0, 0.5], [np.pi, 1.5]),
            )
            for _ in range(3)
        ]
        references.append(render_blobs(blobs, 48, 0.0, False))
        movings.append(render_blobs(blobs, 48, angle, flip))
    references, movings = np.stack(references), np.stack(movings)

    result = align(references, movings)

    angles = np.array([a for a, _ in cases])
    error = np.abs((np.asarray(result.angles) - angles + 180) % 360 - 180)
    assert error.max() < 2.0, error
    np.testing.assert_array_equal(result.flips, [f for _, f in cases])
    assert result.aligned.shape == movings.shape
    # Undoing the transform brings the moving image back onto the reference.
    window = (np.hypot(*(np.mgrid[0:48, 0:48] - 23.5)) < 20)[None]
    residual = np.abs(np.asarray(result.aligned) - references)[
        np.broadcast_to(window, references.shape)
    ]
    assert residual.max() < 0.1 * references.max()
