"""A ViT run's life: trained from the command line, checkpointed, resumed,
refused under other settings, embedded and evaluated, as the VQ families."""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_same_tree
from flax.training.train_state import TrainState

from dlfb_localization import evaluate as evaluate_module
from dlfb_localization import loop
from dlfb_localization.checkpoint import ConfigMismatchError
from dlfb_localization.cli import main
from dlfb_localization.dataset import Dataset
from dlfb_localization.embeddings import get_frame_embeddings
from dlfb_localization.evaluate import evaluate
from dlfb_localization.figures import write_model_figures
from dlfb_localization.run_families import MODELS, vit_learning_rate
from dlfb_localization.runs import RunConfig, create_state, load_run, train_run

# 16x16 crops in 4x4 patches; P x K = 2 x 4 crops a batch.
TINY_VIT = {
    "model": "vit",
    "objective": "subcell",
    "vit_size": "tiny",
    "patch_size": 4,
    "proteins_per_batch": 2,
    "crops_per_protein": 4,
    "seed": 0,
}
EPOCHS = 2


def _flags(settings: dict) -> list[str]:
    return [
        part
        for name, value in settings.items()
        for part in ("--" + name.replace("_", "-"), str(value))
    ]


def _train_vit(path, store):
    """A tiny ViT run trained by `dlfb-localization train`, read back:
    (its RunConfig, `load_run`'s Run)."""
    data = ["--data", str(path), "--cache-dir", str(path.parent / "cache")]
    command = ["train", *data, "--store", str(store), *_flags(TINY_VIT)]
    assert main([*command, "--epochs", str(EPOCHS)]) == 0
    config = RunConfig(
        data=str(path),
        cache_dir=str(path.parent / "cache"),
        num_epochs=EPOCHS,
        **TINY_VIT,
    )
    return config, load_run(store)


def test_a_vit_run_trains_resumes_refuses_other_settings_and_embeds(
    module_tiny_release, tmp_path, monkeypatch
):
    """One test, so that its tiny run is trained once (a module fixture is
    built again in each xdist worker that runs one of the module's tests)."""
    store = tmp_path / "run"
    config, run = _train_vit(module_tiny_release[0], store)
    _check_settings_and_optimizer(config, run)
    _check_resume(config, run, tmp_path / "stopped", monkeypatch)
    _check_refusal(config, store)
    _check_embedding_and_evaluation(run, monkeypatch)
    _check_figures(store, tmp_path / "figures")
    _check_no_mae_figure_without_reconstruction(config, run, tmp_path / "protein")
    _check_export(store, tmp_path / "embeddings", width=2 * 64)


def _check_settings_and_optimizer(config, run):
    assert run.config.settings() == config.settings()
    recorded = config.to_json()
    # The ViT's settings, and not the codebook's or the head's.
    assert recorded["objective"] == "subcell" and recorded["patch_size"] == 4
    assert "num_embeddings" not in recorded and "lookup" not in recorded
    assert config.learning_rate == 1e-4  # SubCell's AdamW
    # Two epochs of P x K batches went by, with the losses of all three tasks.
    history = run.metrics["train"]
    assert [r["epoch"] for r in history["total_loss"]] == list(range(EPOCHS))
    assert {"recon_loss", "nt_xent_loss", "supcon_loss"} <= set(history)
    assert np.isfinite(history["total_loss"][-1]["mean"])
    assert int(run.state.step) > 0
    # SubCell's AdamW (its chain has a weight-decay stage Adam's lacks), its
    # rate a schedule whose count went along with the run's steps.
    adamw = optax.adamw(lambda count: 1e-4, b1=0.9, b2=0.95, weight_decay=0.05)
    structure = jax.tree.structure(adamw.init(run.state.params))
    assert jax.tree.structure(run.state.opt_state) == structure
    constant = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.05)
    assert jax.tree.structure(constant.init(run.state.params)) != structure
    adam = jax.tree.structure(optax.adam(1e-4).init(run.state.params))
    assert adam != structure
    counts = [
        int(leaf.count)
        for leaf in jax.tree.leaves(
            run.state.opt_state,
            is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState),
        )
        if isinstance(leaf, optax.ScaleByScheduleState)
    ]
    assert counts == [int(run.state.step)]


def test_the_vit_learning_rate_warms_up_then_decays_over_the_run():
    config = RunConfig(data="data", num_epochs=4, **TINY_VIT)
    schedule = vit_learning_rate(config.learning_rate, num_steps=100)
    rates = np.array([float(schedule(step)) for step in range(100)])
    assert rates[0] == 0.0
    # Up over the first 5% of the steps, then down to 1% of the peak at the
    # last step.
    assert int(np.argmax(rates)) == 5
    np.testing.assert_allclose(rates[5], config.learning_rate, rtol=1e-6)
    assert np.all(np.diff(rates[:6]) > 0) and np.all(np.diff(rates[5:]) < 0)
    np.testing.assert_allclose(rates[-1], 0.01 * config.learning_rate, rtol=1e-4)

    # The family's AdamW steps by it over 4 epochs of 25 steps: with a
    # constant gradient (and weights at zero, so no decay), Adam's
    # bias-corrected step is the rate itself.
    tx = MODELS["vit"].optimizer(config, 25)
    params, grads = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
    opt_state, steps = tx.init(params), []
    for _ in range(8):
        updates, opt_state = tx.update(grads, opt_state, params)
        steps.append(-float(updates["w"][0]))
    np.testing.assert_allclose(steps, rates[:8], rtol=1e-6)

    # The VQ families' Adam keeps the chapter's constant 1e-3.
    chapter = RunConfig(data="data", num_epochs=4)
    tx = MODELS["chapter"].optimizer(chapter, 25)
    opt_state, steps = tx.init(params), []
    for _ in range(3):
        updates, opt_state = tx.update(grads, opt_state, params)
        steps.append(-float(updates["w"][0]))
    np.testing.assert_allclose(steps, 1e-3, rtol=1e-4)


class _Bar:
    """Records what `loop.fit` tells its progress bar."""

    bars: ClassVar[list] = []

    def __init__(self, total, initial, unit):
        self.total, self.n = total, initial
        _Bar.bars.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self):
        self.n += 1

    def refresh(self):
        pass

    def set_description(self, text):
        pass

    def set_postfix_str(self, text):
        pass


def test_the_progress_bar_counts_the_steps_the_batches_give(monkeypatch):
    """Three batches an epoch, where the split's shuffled ones would be six;
    an epoch of two corrects the total."""
    split = Dataset.from_arrays(
        np.zeros((12, 4, 4, 1), np.float32), np.zeros(12, np.int32)
    )
    sizes = iter([3, 2])

    def batches(rng):
        for _ in range(next(sizes)):
            yield next(split.get_batches(rng, 2))

    def step(state, batch):
        return state.replace(step=state.step + 1), {"total_loss": jnp.float32(0)}

    monkeypatch.setattr(loop, "tqdm", _Bar)
    _Bar.bars.clear()
    state = TrainState(step=0, apply_fn=None, params={}, tx=None, opt_state=None)
    state, _ = loop.fit(
        state,
        step,
        split,
        jax.random.key(0),
        num_epochs=2,
        batch_size=2,
        batches=batches,
        steps_per_epoch=3,
    )
    (bar,) = _Bar.bars
    assert int(state.step) == bar.n == bar.total == 5


def test_the_vq_families_record_nothing_of_the_vit():
    chapter = RunConfig(data="data").to_json()
    assert not {"objective", "vit_size", "patch_size", "weight_decay"} & set(chapter)
    assert chapter["learning_rate"] == 1e-3
    # A record written before the ViT existed reads back as the same run.
    assert RunConfig.from_json(chapter) == RunConfig(data="data")


class _Stop(Exception):
    pass


def _check_resume(config, reference, store, monkeypatch):
    """Stopped after epoch 1 and resumed: bitwise the uninterrupted run."""
    save_epoch = loop.checkpoint.save_epoch

    def save_then_stop(manager, state, epoch, *args, **kwargs):
        save_epoch(manager, state, epoch, *args, **kwargs)
        if epoch == 0:
            raise _Stop

    monkeypatch.setattr(loop.checkpoint, "save_epoch", save_then_stop)
    with pytest.raises(_Stop):
        train_run(config, store, progress=False)
    monkeypatch.setattr(loop.checkpoint, "save_epoch", save_epoch)
    resumed = train_run(config, store, progress=False)
    assert int(resumed.state.step) == int(reference.state.step)
    assert_same_tree(resumed.state.params, reference.state.params)  # bitwise
    assert_same_tree(resumed.state.opt_state, reference.state.opt_state)
    assert resumed.metrics == reference.metrics


def _check_refusal(config, store):
    other = dataclasses.replace(config, objective="mae")
    with pytest.raises(ConfigMismatchError, match="objective: stored 'subcell'"):
        train_run(other, store, progress=False)


def _check_embedding_and_evaluation(run, monkeypatch):
    """Embeds (pooled vectors, no codebook) and evaluates without codebooks."""
    monkeypatch.setattr(evaluate_module, "_UMAP_MIN_FRAMES", 10**6)  # no UMAP
    split = run.splits["train"]  # six proteins: k-NN and the probe have classes
    embeddings = get_frame_embeddings(run.state, split, batch_size=8)
    width = run.state.model.embedding_dim
    assert width == 2 * 64  # two pooling heads of the tiny ViT's width
    assert set(embeddings) == {"frame_ids", "frame_pooled"}
    assert embeddings["frame_pooled"].shape == (len(split), width)
    assert not any(key.startswith("frame_histograms") for key in embeddings)
    result = evaluate(run.state, split, k=1, frame_embeddings=embeddings)
    knn = result["knn"]["protein"]["all"]["attention_pooled"]
    assert 0 <= knn["accuracy"] <= 1
    assert set(result["probe"]) == {"attention_pooled", "pixels_pca"}
    assert "codebook" not in result and result["reconstruction_mse"] is None


def _check_figures(store, out):
    """`figures` draws what a model without codebooks has: its losses, its
    attention, what its MAE fills in (`subcell` reconstructs), and the UMAP
    and map of its pooled embeddings; nothing of codes."""
    command = ["figures", "--store", str(store), "--split", "train", "--out", str(out)]
    assert main(command) == 0
    assert {p.name for p in out.glob("*.png")} == {
        "attention_run.png",
        "losses_run.png",
        "mae_run.png",
        "umap.png",
    }
    page = (out / "map.html").read_text(encoding="utf-8")
    assert "by Euclidean distance of mean attention-pooled embeddings" in page


def _check_no_mae_figure_without_reconstruction(config, run, out):
    """The `protein` objective masks nothing and has no decoder: no
    `mae_<name>.png` (an untrained state is enough to draw its figures)."""
    protein = dataclasses.replace(config, objective="protein")
    state = create_state(protein, run.splits)
    written = write_model_figures({"protein": (state, None)}, run.splits["train"], out)
    assert set(written) == {"attention_protein", "umap", "map"}
    assert not list(out.glob("mae_*.png"))


def _check_export(store, out, width):
    """`embed` writes the pooled embedding where a VQ-VAE's has codes."""
    import anndata

    command = ["embed", "--store", str(store), "--split", "train", "--out", str(out)]
    assert main(command) == 0
    with np.load(out / "train.npz") as arrays:
        assert arrays["frame_pooled"].shape[1] == width
        assert arrays["protein_pooled"].shape == (6, width)
        assert "frame_histograms" not in arrays
    proteins = anndata.read_h5ad(out / "train_proteins.h5ad")
    assert proteins.shape == (6, width)
    assert list(proteins.obsm) == ["X_attention_pooled"]
