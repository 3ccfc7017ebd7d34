"""The jitted steps and the epoch loop (without checkpoints)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny

from dlfb_localization import train as train_module
from dlfb_localization.dataset import Dataset
from dlfb_localization.model import LocalizationModel
from dlfb_localization.train import eval_step, train, train_step

# No dropout, so that training and evaluation compute the same forward pass.
MODEL = LocalizationModel(**tiny.CHAPTER)
# One optimizer object for the whole module: a new one recompiles the step.
TX = optax.adam(3e-3)
WEIGHT = jnp.float32(1.0)
NO_WEIGHT = jnp.float32(0.0)


def make_state(seed: int = 0):
    dummy_input = np.zeros((1, 16, 16, 1), dtype=np.float32)
    return MODEL.create_train_state(jax.random.key(seed), dummy_input, TX)


def make_batch(n: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "images": rng.random((n, 16, 16, 1), dtype=np.float32),
        "labels": (np.arange(n) % 4).astype(np.int32),
    }


def test_thirty_steps_on_one_batch_halve_the_loss_with_one_trace(monkeypatch):
    traces = []
    original = train_module.compute_losses

    def counting_compute_losses(*args, **kwargs):
        traces.append(1)  # runs only while tracing
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "compute_losses", counting_compute_losses)
    train_module._step_program.clear_cache()
    state, batch, rng = make_state(), make_batch(), jax.random.key(0)

    losses = []
    # A weight given as a Python int, a float or a float32 is one program.
    weights = (WEIGHT, 1, 1.0, np.float32(1.0))
    for step in range(30):
        state, metrics = train_step(state, batch, rng, weights[step % len(weights)])
        losses.append(float(metrics["total_loss"]))

    assert len(traces) == 1
    assert int(state.step) == 30
    assert losses[-1] < 0.5 * losses[0], losses


def test_zero_classification_weight_leaves_the_head_untouched():
    state, batch, rng = make_state(), make_batch(), jax.random.key(0)
    before = jax.device_get(state.params)

    for _ in range(3):
        state, metrics = train_step(state, batch, rng, NO_WEIGHT)

    after = jax.device_get(state.params)
    # Adam turns a zero gradient into a zero update, so the head stays bit-equal.
    for old, new in zip(
        jax.tree.leaves(before["classification_head"]),
        jax.tree.leaves(after["classification_head"]),
        strict=True,
    ):
        np.testing.assert_array_equal(old, new)
    assert not np.array_equal(
        before["encoder"]["conv1"]["kernel"], after["encoder"]["conv1"]["kernel"]
    )
    # The unweighted classification loss is still reported, not in the total.
    assert float(metrics["classification_loss"]) > 0.5
    np.testing.assert_allclose(
        metrics["total_loss"],
        metrics["recon_loss"] + metrics["codebook_loss"] + metrics["commitment_loss"],
        rtol=1e-6,
    )


def test_the_number_zero_skips_the_heads_backward_pass_with_the_same_result():
    batch, rng = make_batch(), jax.random.key(0)
    traced, static = make_state(), make_state()
    for _ in range(2):
        traced, traced_metrics = train_step(traced, batch, rng, NO_WEIGHT)
        static, static_metrics = train_step(static, batch, rng, 0)

    # Bit-equal: the head's term only ever added zeros to the gradient.
    for ours, theirs in zip(
        jax.tree.leaves(jax.device_get(static.params)),
        jax.tree.leaves(jax.device_get(traced.params)),
        strict=True,
    ):
        np.testing.assert_array_equal(ours, theirs)
    assert static_metrics.keys() == traced_metrics.keys()
    for name, value in traced_metrics.items():
        np.testing.assert_array_equal(static_metrics[name], value, err_msg=name)

    # The work left out: the head's backward products (two per Dense layer).
    def dots(weight):
        def gradient(params):
            return train_module._value_and_grad(
                params, static, batch, weight, True, {"dropout": rng}
            )

        jaxpr = jax.make_jaxpr(gradient)(static.params)
        return str(jaxpr).count("dot_general")

    assert dots(None) <= dots(NO_WEIGHT) - 4


def test_microbatched_step_is_the_full_batch_step():
    # Plain SGD, so the update is the gradient itself (Adam's first step turns
    # the rounding noise of near-zero gradients into full-size steps). One
    # optimizer object, so equal batch shapes share a compiled step.
    sgd = optax.sgd(1.0)

    def sgd_state():
        dummy_input = np.zeros((1, 16, 16, 1), dtype=np.float32)
        return MODEL.create_train_state(jax.random.key(0), dummy_input, sgd)

    batch = make_batch(n=8, seed=3)
    before = jax.device_get(sgd_state().params)
    whole_state, whole = train_step(sgd_state(), batch, jax.random.key(0), WEIGHT)
    parts_state, parts = train_step(
        sgd_state(), batch, jax.random.key(0), WEIGHT, microbatches=4
    )

    # Same objective, summed in a different order: equal to float rounding.
    for old, a, b in zip(
        jax.tree.leaves(before),
        jax.tree.leaves(whole_state.params),
        jax.tree.leaves(parts_state.params),
        strict=True,
    ):
        np.testing.assert_allclose(old - b, old - a, rtol=1e-4, atol=1e-6)
    assert set(parts) == set(whole)
    for name in whole:
        np.testing.assert_allclose(parts[name], whole[name], rtol=1e-5, err_msg=name)
    # Code usage is counted over the whole batch, not averaged over the passes.
    # The codes of one pass's worth of frames (2), each repeated 4 times: the
    # same code distribution, in the shape whose step is already compiled.
    one_pass = train_step(
        sgd_state(),
        {k: np.repeat(v[::4], 4, axis=0) for k, v in batch.items()},
        jax.random.key(0),
        WEIGHT,
    )[1]
    assert float(parts["perplexity"]) > float(one_pass["perplexity"])


def test_passes_in_programs_of_two_step_like_all_passes_in_one_program():
    """`train_step` runs 4 passes as two programs of two, each adding its
    gradients to the last one's, then an update program. One program of all
    four does the same arithmetic in the same order: the same step up to
    XLA's fusion choices, which may round differently. The model has an EMA
    codebook, whose update reads every pass's codes (the plain model's
    programs are compared with one pass of the whole batch in
    `test_microbatched_step_is_the_full_batch_step`)."""
    from dlfb_localization.model.codebook import CodebookOptions

    ema = LocalizationModel(**tiny.CHAPTER, codebook=CodebookOptions(ema_decay=0.9))
    dummy_input = np.zeros((1, 16, 16, 1), dtype=np.float32)
    batch, rng = make_batch(n=8, seed=5), jax.random.key(1)
    states = [ema.create_train_state(jax.random.key(0), dummy_input, TX) for _ in "ab"]
    programs, programs_metrics = train_step(states[0], batch, rng, WEIGHT, 4)
    one, one_metrics = train_module._step_program(
        states[1], batch, rng, WEIGHT, microbatches=4, augment="none"
    )
    assert int(programs.step) == int(one.step) == 1
    for part in ("params", "opt_state", "collections"):
        a, b = getattr(programs, part), getattr(one, part)
        assert jax.tree.structure(a) == jax.tree.structure(b)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7, err_msg=part)
    # The EMA averages moved.
    fresh = ema.create_train_state(jax.random.key(0), dummy_input, TX).collections
    pairs = zip(
        jax.tree.leaves(fresh), jax.tree.leaves(programs.collections), strict=True
    )
    assert any(not np.array_equal(x, y) for x, y in pairs)
    assert set(programs_metrics) == set(one_metrics)
    for name in one_metrics:
        np.testing.assert_allclose(
            programs_metrics[name], one_metrics[name], rtol=1e-6, err_msg=name
        )


def test_microbatches_must_divide_the_batch():
    with pytest.raises(ValueError, match="does not divide"):
        train_step(make_state(), make_batch(n=6), jax.random.key(0), WEIGHT, 4)


def test_default_microbatches_split_only_cpu_batches_of_whole_passes():
    assert train_module.default_microbatches(256) == 16
    assert train_module.default_microbatches(256, n_devices=2) == 8
    assert train_module.default_microbatches(128) == 8
    assert train_module.default_microbatches(100) == 1
    # Up to 64 frames a device (the demo's 32): one pass.
    assert train_module.default_microbatches(64) == 1
    assert train_module.default_microbatches(32) == 1
    assert train_module.default_microbatches(128, n_devices=2) == 1


def test_passes_run_two_to_a_program_when_two_divide_them():
    from dlfb_localization.passes import program_passes

    assert [program_passes(m) for m in (1, 2, 3, 4, 16)] == [1, 2, 3, 2, 2]


def test_a_step_takes_the_passes_its_model_allows_by_default():
    """`train_step`'s default (the chapter's four-argument call): a VQ-VAE's
    batch of 256 in 16 passes on a CPU, a contrastive model's in one."""
    from types import SimpleNamespace

    from dlfb_localization.model.vit import ViTModel

    chapter = SimpleNamespace(model=MODEL)
    assert train_module.model_microbatches(chapter, 256) == 16
    assert train_module.model_microbatches(chapter, 256, n_devices=2) == 8
    assert train_module.model_microbatches(chapter, 256, n_devices=4) == 1
    assert train_module.model_microbatches(SimpleNamespace(model=ViTModel()), 256) == 1


def test_eval_and_train_compute_the_same_losses_without_dropout():
    state, batch = make_state(), make_batch()

    outputs = jax.jit(
        lambda p, x: MODEL.apply(
            {"params": p},
            x,
            is_training=False,
            method=LocalizationModel.compute_outputs,
        )
    )(state.params, batch["images"])
    evaluated = jax.device_get(eval_step(state, batch, WEIGHT))
    _, trained = train_step(state, batch, jax.random.key(0), WEIGHT)  # donates state
    trained = jax.device_get(trained)

    assert set(evaluated) == {
        "total_loss",
        "recon_loss",
        "codebook_loss",
        "commitment_loss",
        "classification_loss",
        "perplexity",
        "accuracy",
        "codebook_used_fraction",
        "codebook_max_share",
        "latent_norm",
        "codebook_norm",
    }
    assert set(trained) == set(evaluated)
    for name in evaluated:
        np.testing.assert_allclose(
            evaluated[name], trained[name], rtol=1e-6, err_msg=name
        )
    # Mean squared error (not the book's half of it in evaluation).
    mse = np.mean((np.asarray(outputs.decoded) - np.asarray(outputs.targets)) ** 2)
    np.testing.assert_allclose(evaluated["recon_loss"], mse, rtol=1e-5)


@pytest.fixture(scope="module")
def splits():
    rng = np.random.default_rng(1)
    return {
        "train": Dataset.from_arrays(
            rng.random((16, 16, 16, 1), dtype=np.float32), np.arange(16) % 4
        ),
        # 10 frames in batches of 8: the last validation batch holds 2.
        "valid": Dataset.from_arrays(
            rng.random((10, 16, 16, 1), dtype=np.float32), np.arange(10) % 4
        ),
    }


def test_train_records_every_epoch_and_validates_on_schedule(splits):
    initial = make_state()

    state, metrics = train(
        initial,
        jax.random.key(1),
        splits,
        num_epochs=4,
        batch_size=8,
        classification_weight=1.0,
        eval_every=2,
    )

    assert int(state.step) == 4 * 2
    assert set(metrics) == {"train", "valid"}
    assert [r["epoch"] for r in metrics["train"]["total_loss"]] == [0, 1, 2, 3]
    # epoch % eval_every == 0, plus the last epoch.
    assert [r["epoch"] for r in metrics["valid"]["total_loss"]] == [0, 2, 3]
    for split in metrics.values():
        assert set(split) >= {"recon_loss", "perplexity", "codebook_used_fraction"}
        for records in split.values():
            assert all(set(r) == {"mean", "std", "epoch"} for r in records)
    # Training moved on; the caller's state was copied, not donated.
    assert float(jnp.abs(initial.params["encoder"]["conv1"]["kernel"]).sum()) > 0
    assert (
        metrics["train"]["total_loss"][-1]["mean"]
        < (metrics["train"]["total_loss"][0]["mean"])
    )

    # Validation saw every frame once: its frame-weighted mean equals one pass
    # over all 10 frames.
    valid = splits["valid"]
    whole = next(
        valid.get_batches(None, len(valid), shuffle=False, drop_remainder=False)
    )
    expected = eval_step(state, {k: whole[k] for k in ("images", "labels")}, 1.0)
    for name in ("recon_loss", "classification_loss", "accuracy"):
        np.testing.assert_allclose(
            metrics["valid"][name][-1]["mean"], expected[name], rtol=1e-5, err_msg=name
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_epochs": 0}, "num_epochs"),
        ({"eval_every": 0}, "eval_every"),
        ({"batch_size": 17}, "batch_size"),
    ],
)
def test_bad_arguments_are_named(splits, kwargs, message):
    arguments = dict(num_epochs=1, batch_size=8, classification_weight=1.0)
    with pytest.raises(ValueError, match=message):
        train(make_state(), jax.random.key(0), splits, **(arguments | kwargs))


def test_more_proteins_than_the_head_predicts_is_an_error_not_a_nan(splits):
    # MODEL's head predicts 4 classes; these frames hold 5 proteins.
    five = Dataset.from_arrays(np.zeros((10, 16, 16, 1), np.float32), np.arange(10) % 5)
    with pytest.raises(
        ValueError, match=r"'train' split has protein class 4.*4 classes"
    ):
        train(make_state(), jax.random.key(0), splits | {"train": five}, 1, 8, 1.0)


def test_runs_with_the_same_settings_share_their_compiled_steps(module_tiny_release):
    """Two states built for the same settings (two runs, a rerun, another seed)
    have equal static fields, so `train_step` is traced and compiled once for
    both; another learning rate is another program."""
    import dataclasses

    from dlfb_localization.runs import RunConfig, build_splits, create_state

    config = RunConfig(
        data=str(module_tiny_release[0]), embedding_dim=8, num_embeddings=16
    )
    splits = build_splits(config)
    first, second = create_state(config, splits), create_state(config, splits)
    assert first.tx is second.tx and first.apply_fn == second.apply_fn
    assert jax.tree.structure(first) == jax.tree.structure(second)
    other = create_state(dataclasses.replace(config, learning_rate=1e-2), splits)
    assert jax.tree.structure(other) != jax.tree.structure(first)

    batch = next(splits["train"].get_batches(jax.random.key(0), 8))
    batch = {"images": batch["images"], "labels": batch["labels"]}
    compiled = []
    for state in (first, second):
        train_step(state, batch, jax.random.key(1), WEIGHT, 1)
        compiled.append(train_module._step_program._cache_size())
    assert compiled[1] == compiled[0]
