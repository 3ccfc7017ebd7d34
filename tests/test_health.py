"""The training-health monitor, and a chapter recipe that trains healthily."""

import warnings

import jax
import numpy as np
import optax
import pytest
from flax import traverse_util

from dlfb_localization.dataset.builder import DatasetBuilder
from dlfb_localization.dataset.synthetic import SyntheticSpec, write_release
from dlfb_localization.dataset.utils import count_unique_proteins
from dlfb_localization.health import TrainingHealthWarning, check_health
from dlfb_localization.model import LocalizationModel
from dlfb_localization.model.codebook import CodebookOptions
from dlfb_localization.train import train


def _history(**series) -> dict:
    return {
        "train": {
            name: [{"mean": v, "std": 0.0, "epoch": i} for i, v in enumerate(values)]
            for name, values in series.items()
        }
    }


HEALTHY = {
    "codebook_loss": [0.020, 0.019, 0.018],
    "perplexity": [110.0, 80.0, 100.0],
    "codebook_used_fraction": [0.9, 0.8, 0.85],
}


def test_a_healthy_history_passes_every_check():
    for epochs in range(1, 4):
        history = _history(**{k: v[:epochs] for k, v in HEALTHY.items()})
        assert check_health(history) == []


def test_a_codebook_loss_running_away_is_flagged_at_the_second_epoch():
    history = _history(
        codebook_loss=[1.99, 7.5], latent_norm=[3.0, 9.0], codebook_norm=[0.2, 0.25]
    )
    (issue,) = check_health(history)
    assert (issue.check, issue.level, issue.epoch) == ("codebook_drift", "", 1)
    assert "1.99 -> 7.5" in issue.message and "3 -> 9" in issue.message
    assert "normalize" in issue.message or "cosine" in issue.message
    # Falling back below the threshold, or still rising but within it, passes.
    assert check_health(_history(codebook_loss=[2.0, 7.5, 7.0])) == []
    assert check_health(_history(codebook_loss=[2.0, 2.5, 2.9])) == []


def test_perplexity_collapse_and_dead_codes_are_flagged_per_level():
    history = _history(
        codebook_loss_local=[0.02, 0.02],
        perplexity_local=[100.0, 90.0],
        codebook_used_fraction_local=[0.9, 0.9],
        codebook_loss_global=[0.02, 0.02],
        perplexity_global=[60.0, 20.0],
        codebook_used_fraction_global=[0.5, 0.1],
    )
    issues = {(i.check, i.level) for i in check_health(history)}
    assert issues == {("perplexity_collapse", "global"), ("dead_codes", "global")}


# The chapter's model (D=64, K=512, beta 0.25, dropout 0.45, two head layers)
# on small crops of the generator, trained as the chapter trains it.
@pytest.fixture(scope="module")
def small_splits(tmp_path_factory):
    path = tmp_path_factory.mktemp("health") / "release"
    spec = SyntheticSpec(
        n_proteins=12, fovs_per_protein=2, crops_per_fov=8, n_blocks=1, image_size=32
    )
    write_release(path, spec)
    return DatasetBuilder(path).build(
        rng=jax.random.PRNGKey(0), splits={"train": 0.8, "valid": 0.2}
    )


def _chapter_model(splits, lookup: str) -> LocalizationModel:
    return LocalizationModel(
        num_classes=count_unique_proteins(splits),
        embedding_dim=64,
        num_embeddings=512,
        commitment_cost=0.25,
        dropout_rate=0.45,
        classification_head_layers=2,
        codebook=CodebookOptions(lookup=lookup),
    )


def _train(splits, model, tx, epochs=6):
    state = model.create_train_state(
        jax.random.PRNGKey(1), splits["train"].get_dummy_input(), tx
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, metrics = train(state, jax.random.PRNGKey(2), splits, epochs, 16, 1.0)
    health = [w for w in caught if issubclass(w.category, TrainingHealthWarning)]
    return metrics, health


def _trend(values) -> float:
    """Least-squares slope of log(values) per epoch."""
    return float(np.polyfit(np.arange(len(values)), np.log(values), 1)[0])


@pytest.mark.parametrize("lookup", ["cosine", "euclidean"])
def test_the_default_lookup_trains_healthily_and_the_chapters_runs_away(
    small_splits, lookup
):
    """The chapter's recipe with the default (cosine) lookup: codebook and
    commitment losses fall from the second epoch on, and nothing is flagged.
    With the chapter's Euclidean lookup on the same data they grow, and the
    monitor says so at the second epoch."""
    metrics, health = _train(
        small_splits, _chapter_model(small_splits, lookup), optax.adam(1e-3)
    )
    train_metrics = metrics["train"]
    for name in ("codebook_loss", "commitment_loss"):
        first, *after_first = [r["mean"] for r in train_metrics[name]]
        if lookup == "cosine":
            assert _trend(after_first) < 0, (name, after_first)
        else:  # several times the first epoch's, in every later epoch
            assert min(after_first) > 2 * first, (name, first, after_first)
    drift = [r["mean"] for r in train_metrics["health_codebook_drift"]]
    if lookup == "cosine":
        assert health == [] and drift == [0.0] * len(drift)
    else:
        assert drift[1] == 1.0
        assert any("codebook loss rising" in str(w.message) for w in health)


def test_an_encoder_with_a_ten_times_learning_rate_is_flagged_at_once(small_splits):
    """The broken run: the encoder alone learns at 10x the rate, so its outputs
    outrun the codebook (with the chapter's Euclidean lookup), and the monitor
    says so at the second epoch: the codebook loss triples (47 -> 147 with this
    suite's XLA flags, 46 -> 153 with XLA's defaults), against the 1.5x it
    flags. At 100x the first epoch already blows up (a codebook loss near
    900) and falls after it, so whether a later epoch rises 1.5x above the
    lowest one hangs on float order: it did on one CPU and not on another."""
    model = _chapter_model(small_splits, "euclidean")

    def label(params):
        flat = traverse_util.flatten_dict(params)
        return traverse_util.unflatten_dict(
            {k: "encoder" if k[0] == "encoder" else "rest" for k in flat}
        )

    tx = optax.multi_transform(
        {"encoder": optax.adam(1e-2), "rest": optax.adam(1e-3)}, label
    )
    metrics, health = _train(small_splits, model, tx, epochs=2)
    (drift,) = [w for w in health if "codebook loss rising" in str(w.message)]
    assert str(drift.message).startswith("epoch 2: ")
    losses = [r["mean"] for r in metrics["train"]["codebook_loss"]]
    assert losses[1] > 2 * losses[0], losses
    flags = [r["mean"] for r in metrics["train"]["health_codebook_drift"]]
    assert flags == [0.0, 1.0]
