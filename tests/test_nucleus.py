"""Predicting the protein image from the nucleus: U-Net, pix2pix, evaluation, CLI."""

import json
import logging
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from scipy import ndimage

from dlfb_localization.checkpoint import ConfigMismatchError
from dlfb_localization.cli import main
from dlfb_localization.dataset import Dataset
from dlfb_localization.nucleus import train as nucleus_train
from dlfb_localization.nucleus.evaluate import (
    BASELINE,
    compute_mean_images,
    compute_pixel_correlation,
    evaluate_predictions,
    predict_images,
)
from dlfb_localization.nucleus.figures import plot_predictions
from dlfb_localization.nucleus.model import ConditionalUNet, PatchDiscriminator
from dlfb_localization.nucleus.train import (
    GANState,
    create_gan_state,
    create_unet_state,
    train_gan,
    train_unet,
)

SIZE = 16
# One model, discriminator and optimizer for every test, so each jitted function
# compiles once (initialization is the slow part on a CPU). The model is also the
# one `predict` builds for the tiny release with the flags the CLI test passes.
MODEL = ConditionalUNet(num_proteins=6, features=4, depth=1, embedding_dim=32)
DISCRIMINATOR = PatchDiscriminator(features=4, depth=1)
TX = optax.adam(3e-3)


@pytest.fixture(scope="module")
def unet_state():
    return create_unet_state(MODEL, jax.random.PRNGKey(0), SIZE, TX)


@pytest.fixture(scope="module")
def gan_state():
    return create_gan_state(MODEL, DISCRIMINATOR, jax.random.PRNGKey(0), SIZE)


def make_split(n: int, seed: int, channels: int = 2) -> Dataset:
    """Smooth random "nuclei"; the protein is a fixed function of the nucleus per
    protein: itself (0), its inverse (1), or itself shifted by 2 px (2)."""
    rng = np.random.default_rng(seed)
    nucleus = ndimage.gaussian_filter(
        rng.random((n, SIZE, SIZE)), sigma=(0, 1.5, 1.5), mode="wrap"
    )
    low = nucleus.min(axis=(1, 2), keepdims=True)
    nucleus = (nucleus - low) / (nucleus.max(axis=(1, 2), keepdims=True) - low)
    ids = np.arange(n) % 3
    protein = np.choose(
        ids[:, None, None], [nucleus, 1 - nucleus, np.roll(nucleus, 2, axis=2)]
    )
    images = np.stack([protein, nucleus], axis=-1)[..., :channels]
    localizations = np.array(["er", "nucleoplasm", "er;golgi"])[ids]
    return Dataset.from_arrays(
        images, ids, localizations=localizations, fov_ids=np.arange(n)
    )


def test_unet_keeps_any_image_shape_and_starts_as_a_plain_unet(unet_state):
    images = np.random.default_rng(0).random((2, 17, 17, 2), dtype=np.float32)
    predicted = predict_images(unet_state, images, np.array([0, 5]), image_size=17)
    assert predicted.shape == (2, 17, 17)  # padded to 18 inside, cropped back
    # FiLM starts as the identity: before training, the protein changes nothing.
    again = predict_images(unet_state, images, np.array([3, 1]), image_size=17)
    np.testing.assert_allclose(predicted, again, atol=1e-6)


def test_unet_learns_each_proteins_mapping_and_beats_the_mean_image():
    train, test = make_split(96, seed=0), make_split(24, seed=1)
    state = create_unet_state(MODEL, jax.random.PRNGKey(0), SIZE, TX)
    state, history = train_unet(
        state,
        jax.random.PRNGKey(1),
        train,
        num_epochs=30,
        batch_size=16,
        image_size=SIZE,
    )
    losses = [record["mean"] for record in history["train"]["mse"]]
    assert len(losses) == 30 and losses[-1] < losses[0] / 4
    result = evaluate_predictions({"unet": state}, train, test, image_size=SIZE)
    unet, baseline = result["overall"]["unet"], result["overall"][BASELINE]
    # Random nuclei average out to a flat mean image: it cannot place a pattern.
    assert unet["mse"] < baseline["mse"] / 3
    assert unet["correlation"] > 0.8 > 0.2 > abs(baseline["correlation"])
    assert set(result["per_localization"]) == {"er", "nucleoplasm"}
    assert result["per_localization"]["er"]["n_frames"] == 16
    # The same nucleus as protein 0 (itself) and 1 (its inverse): opposite images.
    images = test.images.frames[:1].repeat(2, axis=0)
    as_0, as_1 = predict_images(state, images, np.array([0, 1]), SIZE)
    assert np.corrcoef(as_0.ravel(), as_1.ravel())[0, 1] < -0.8


def test_patch_discriminator_judges_local_patches(gan_state):
    image = np.random.default_rng(0).random((1, SIZE, SIZE, 1), dtype=np.float32)
    judge = jax.jit(DISCRIMINATOR.apply)
    variables = {"params": gan_state.discriminator.params}
    logits = judge(variables, image, image)
    assert logits.shape == (1, 6, 6, 1)  # 16 / 2 - 2 patches a side
    brighter = image.copy()
    brighter[0, 0] += 1.0  # the first row of pixels
    changed = judge(variables, image, brighter)
    difference = np.abs(np.asarray(changed - logits))[0, ..., 0]
    assert np.all(difference[0] > 0)  # the patches along the changed first row
    assert np.all(difference[-1] == 0)  # and not the far ones


def test_gan_training_updates_both_networks_and_is_deterministic(gan_state):
    train = make_split(32, seed=0)
    runs = [
        train_gan(
            gan_state,
            jax.random.PRNGKey(1),
            train,
            num_epochs=1,
            batch_size=16,
            image_size=SIZE,
        )
        for _ in range(2)
    ]
    (state, history), (again, _) = runs
    assert int(state.step) == 2
    for net in ("generator", "discriminator"):
        before = jax.tree.leaves(getattr(gan_state, net).params)
        after = jax.tree.leaves(getattr(state, net).params)
        changed = [not np.array_equal(a, b) for a, b in zip(before, after, strict=True)]
        assert all(changed), net
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    assert set(history["train"]) == {
        "generator_loss",
        "adversarial_loss",
        "l1_loss",
        "discriminator_loss",
    }


def test_pixel_correlation_is_pearsons_r_of_each_frame():
    rng = np.random.default_rng(0)
    predicted, real = rng.random((3, 5, 4)), rng.random((3, 5, 4))
    real[1] = 2 * predicted[1] + 1
    expected = [
        np.corrcoef(p.ravel(), r.ravel())[0, 1]
        for p, r in zip(predicted, real, strict=True)
    ]
    np.testing.assert_allclose(
        compute_pixel_correlation(predicted, real), expected, rtol=1e-12
    )
    assert compute_pixel_correlation(predicted, real)[1] == pytest.approx(1.0)
    assert compute_pixel_correlation(np.ones((1, 4, 4)), real[:1, :4])[0] == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        compute_pixel_correlation(predicted, real[:2])


def test_the_baseline_is_the_mean_of_training_frames_only():
    train, test = make_split(12, seed=0), make_split(6, seed=1)
    means, counts = compute_mean_images(train, num_proteins=3, image_size=SIZE)
    frames = train.images.frames[..., 0]
    np.testing.assert_array_equal(counts, [4, 4, 4])
    for code in range(3):
        np.testing.assert_allclose(
            means[code], frames[train.labels.codes == code].mean(axis=0), atol=1e-6
        )
    result = evaluate_predictions({}, train, test, image_size=SIZE)
    real = test.images.frames[..., 0]
    predicted = means[test.labels.codes]
    r = [
        np.corrcoef(p.ravel(), t.ravel())[0, 1]
        for p, t in zip(predicted, real, strict=True)
    ]
    assert result["overall"][BASELINE]["correlation"] == pytest.approx(np.mean(r))
    assert result["overall"][BASELINE]["mse"] == pytest.approx(
        np.mean((predicted - real) ** 2), rel=1e-5
    )
    er = test.labels.codes != 1
    assert result["per_localization"]["er"][BASELINE]["correlation"] == pytest.approx(
        np.mean(np.array(r)[er])
    )


def test_bad_input_is_a_clear_error(unet_state):
    state = unet_state
    fit = {"num_epochs": 1, "batch_size": 4, "image_size": SIZE}
    with pytest.raises(ValueError, match="needs 2 channels"):
        train_unet(state, jax.random.PRNGKey(0), make_split(8, 0, channels=1), **fit)
    seven_proteins = Dataset.from_arrays(
        np.zeros((8, SIZE, SIZE, 2)), np.arange(8) % 7, fov_ids=np.arange(8)
    )
    with pytest.raises(ValueError, match=r"codes 0\.\.6 but the model embeds 6"):
        train_unet(state, jax.random.PRNGKey(0), seven_proteins, **fit)
    with pytest.raises(ValueError, match="embeds 6"):
        evaluate_predictions(
            {"unet": state}, make_split(8, 0), seven_proteins, image_size=SIZE
        )


def test_plot_predictions_shows_nucleus_real_unet_and_gan(unet_state, gan_state):
    split = make_split(12, seed=0)
    unet, gan = unet_state, gan_state.generator
    fig = plot_predictions(split, unet, image_size=SIZE, gan=gan, n_frames=3)
    titles = [ax.get_title() for ax in fig.axes[:4]]
    assert titles == ["nucleus", "real", "U-Net", "GAN"] and len(fig.axes) == 12
    rows = np.searchsorted(split.labels.frame_ids, split.sample_frame_ids(3, 0))
    expected = [
        f"P{code}\n{['er', 'nucleoplasm', 'er'][code]}"
        for code in split.labels.codes[rows]
    ]
    assert [fig.axes[4 * row].get_ylabel() for row in range(3)] == expected
    fig = plot_predictions(split, unet, image_size=SIZE, n_frames=2)
    assert [ax.get_title() for ax in fig.axes[:3]] == ["nucleus", "real", "U-Net"]
    assert len(fig.axes) == 6


def test_cli_predict_writes_its_files_and_restores_on_a_rerun(tiny_release, tmp_path):
    path, _, _ = tiny_release
    out = tmp_path / "predict"
    args = ["predict", "--data", str(path), "--out", str(out), "--epochs", "1"]
    args += ["--batch-size", "8", "--image-size", "16", "--features", "4"]
    args += ["--depth", "1"]
    assert main(args) == 0
    result = json.loads((out / "evaluation.json").read_text())
    assert set(result["overall"]) == {"unet", BASELINE}
    assert result["n_frames"] + result["n_frames_left_out"] == 16  # 20% of 18 FOVs
    assert (out / "predictions.png").stat().st_size > 0
    assert json.loads((out / "config.json").read_text())["num_epochs"] == 1
    steps = sorted(p.name for p in (out / "checkpoints" / "unet").iterdir())
    assert steps == ["7"]  # 56 training frames // 8 per batch, one epoch
    assert main(args) == 0  # restored, not retrained: the same numbers
    assert json.loads((out / "evaluation.json").read_text()) == result
    assert main([*args, "--learning-rate", "0.01"]) == 1  # another model, same folder


# Checkpointed runs: two steps of 16 frames an epoch (the batch the tests above
# compile for).
CHECKPOINTED = {"batch_size": 16, "image_size": SIZE}


class _Interrupted(Exception):
    """Stands in for a kill in the middle of an epoch."""


def _steps_on_disk(path: Path) -> list[int]:
    return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit())


def _snapshot(path: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def _assert_same_leaves(a, b) -> None:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bitwise


def _forbid(monkeypatch, step_name: str) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("a step ran, but the run should have been restored")

    monkeypatch.setattr(nucleus_train, step_name, fail)


def test_an_interrupted_unet_run_resumes_and_ends_identical(
    unet_state, tmp_path, monkeypatch, caplog
):
    split, rng = make_split(32, seed=0), jax.random.PRNGKey(1)
    reference_state, reference_history = train_unet(
        unet_state, rng, split, num_epochs=2, **CHECKPOINTED
    )
    store = tmp_path / "unet"
    step, calls = nucleus_train.unet_train_step, []

    def interrupted(state, batch, image_size):
        if len(calls) == 2:  # the first step of epoch 1
            raise _Interrupted
        calls.append(1)
        return step(state, batch, image_size)

    monkeypatch.setattr(nucleus_train, "unet_train_step", interrupted)
    with pytest.raises(_Interrupted):
        train_unet(
            unet_state, rng, split, num_epochs=2, store_path=store, **CHECKPOINTED
        )
    monkeypatch.undo()
    assert _steps_on_disk(store) == [2]  # epoch 0's checkpoint only

    with caplog.at_level(logging.INFO, logger="dlfb_localization"):
        state, history = train_unet(
            unet_state, rng, split, num_epochs=2, store_path=store, **CHECKPOINTED
        )

    assert any("resuming" in record.getMessage() for record in caplog.records)
    assert int(state.step) == int(reference_state.step) == 4
    _assert_same_leaves(state.params, reference_state.params)
    _assert_same_leaves(state.opt_state, reference_state.opt_state)
    assert history == reference_history
    assert [r["epoch"] for r in history["train"]["mse"]] == [0, 1]
    assert _steps_on_disk(store) == [2, 4]


def test_a_finished_unet_run_is_restored_and_another_is_refused_by_name(
    unet_state, tmp_path, monkeypatch
):
    split, rng = make_split(32, seed=0), jax.random.PRNGKey(1)
    store = tmp_path / "unet"
    run = {"num_epochs": 1, "store_path": store, **CHECKPOINTED}
    trained, history = train_unet(unet_state, rng, split, settings={"seed": 0}, **run)
    before = _snapshot(store)
    _forbid(monkeypatch, "unet_train_step")

    state, again = train_unet(unet_state, rng, split, settings={"seed": 0}, **run)

    assert int(state.step) == 2
    _assert_same_leaves(state, trained)
    assert again == history
    with pytest.raises(ConfigMismatchError, match="batch_size: stored 16, now 8"):
        train_unet(unet_state, rng, split, **{**run, "batch_size": 8})
    with pytest.raises(ConfigMismatchError, match=r"settings\.seed: stored 0, now 1"):
        train_unet(unet_state, rng, split, settings={"seed": 1}, **run)
    other_init = create_unet_state(MODEL, jax.random.PRNGKey(5), SIZE, TX)
    with pytest.raises(ConfigMismatchError, match="init_params"):
        train_unet(other_init, rng, split, settings={"seed": 0}, **run)
    faster = create_unet_state(MODEL, jax.random.PRNGKey(0), SIZE, optax.adam(1e-2))
    with pytest.raises(ConfigMismatchError, match=r"optimizer\.probe_update"):
        train_unet(faster, rng, split, settings={"seed": 0}, **run)
    assert _snapshot(store) == before


def test_a_gan_run_checkpoints_both_networks_and_is_restored(
    gan_state, tmp_path, monkeypatch
):
    split, rng = make_split(32, seed=0), jax.random.PRNGKey(1)
    store = tmp_path / "gan"
    run = {"num_epochs": 1, "store_path": store, **CHECKPOINTED}
    trained, history = train_gan(gan_state, rng, split, **run)
    assert _steps_on_disk(store) == [2]
    _forbid(monkeypatch, "gan_train_step")

    state, again = train_gan(gan_state, rng, split, **run)

    assert isinstance(state, GANState) and int(state.step) == 2
    _assert_same_leaves(state, trained)
    assert again == history
    with pytest.raises(
        ConfigMismatchError, match=r"l1_weight: stored 100\.0, now 10\.0"
    ):
        train_gan(gan_state, rng, split, l1_weight=10.0, **run)
    other_init = create_gan_state(MODEL, DISCRIMINATOR, jax.random.PRNGKey(3), SIZE)
    with pytest.raises(ConfigMismatchError, match=r"discriminator\.init_params: "):
        train_gan(other_init, rng, split, **run)
