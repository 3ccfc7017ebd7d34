"""The `dlfb-localization` command line."""

import json

import numpy as np
import pytest

from dlfb_localization.cli import main


def test_prepare_builds_the_cache(tiny_release, capsys):
    path, _, _ = tiny_release
    assert (
        main(["prepare", str(path), "--channels", "0,1", "--cache-dtype", "float16"])
        == 0
    )
    assert (path / "dlfb_cache" / "images_c0-1_f16.npy").exists()
    assert "72 frames, 6 proteins" in capsys.readouterr().out


def test_bad_path_is_a_clear_error_with_exit_2(tmp_path, capsys):
    assert main(["prepare", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_flag_value_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "x", "--cache-dtype", "int8"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'int8'" in capsys.readouterr().err


TINY_MODEL = ["--embedding-dim", "8", "--num-embeddings", "16", "--batch-size", "8"]


@pytest.fixture(scope="module")
def trained(module_tiny_release, tmp_path_factory):
    """One tiny run trained by `train`, for this module's tests to read:
    (train command line without --epochs, run folder, exit code)."""
    path, _, _ = module_tiny_release
    store = tmp_path_factory.mktemp("runs") / "run"
    train = ["train", "--data", str(path), "--store", str(store), *TINY_MODEL]
    return train, store, main([*train, "--epochs", "2"])


def test_train_evaluate_embed_and_figures_from_a_run_folder(trained, tmp_path, capsys):
    _, store, exit_code = trained
    assert exit_code == 0
    config = json.loads((store / "config.json").read_text())
    assert config["num_epochs"] == 2 and config["embedding_dim"] == 8
    metrics = json.loads((store / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["train"]["total_loss"]] == [0, 1]

    capsys.readouterr()
    assert main(["evaluate", "--store", str(store), "--split", "train"]) == 0
    result = json.loads((store / "evaluation_train.json").read_text())
    assert result["n_proteins"] == 6
    # What the accuracies mean is printed beside them; the stages show a bar.
    printed = capsys.readouterr()
    assert "frames of 6 proteins" in printed.out
    chance = result["knn"]["protein"]["all"]["majority_class"]["accuracy"]
    ceiling = result["labels"]["all"]["protein_accuracy_ceiling"]
    assert f"(chance {chance:.3f}, ceiling {ceiling:.3f})" in printed.out
    assert "evaluating: 100%" in printed.err
    assert result["knn"]["protein"]["all"]["codebook_histogram"] is not None

    out = tmp_path / "embeddings"
    assert (
        main(["embed", "--store", str(store), "--split", "train", "--out", str(out)])
        == 0
    )
    arrays = np.load(out / "train.npz")
    assert arrays["frame_histograms"].shape[1] == 16
    assert len(arrays["frame_ids"]) == result["n_frames"]

    figures = tmp_path / "figures"
    assert (
        main(
            [
                "figures",
                "--store",
                str(store),
                "--split",
                "train",
                "--out",
                str(figures),
            ]
        )
        == 0
    )
    names = {p.name for p in figures.glob("*.png")}
    assert {"umap.png", "reconstructions_run.png", "losses_run.png"} <= names


def test_training_counts_steps_and_a_rerun_says_it_restores(
    module_tiny_release, tmp_path, capsys
):
    path, _, _ = module_tiny_release
    train = ["train", "--data", str(path), "--store", str(tmp_path / "run")]
    assert main([*train, *TINY_MODEL, "--epochs", "2"]) == 0
    err = capsys.readouterr().err
    # 72 frames, 80% for training: 57 frames, 7 steps of 8 per epoch.
    assert "training 2 epochs, checkpointed in" in err
    assert "Epoch 2/2" in err and "14/14" in err
    assert main([*train, *TINY_MODEL, "--epochs", "2"]) == 0
    err = capsys.readouterr().err
    assert "restored the finished run" in err and "Epoch" not in err


def test_train_refuses_a_store_with_other_settings(trained, capsys):
    train, store, exit_code = trained
    assert exit_code == 0
    before = sorted(p.name for p in (store / "checkpoints").iterdir())
    capsys.readouterr()
    assert main([*train, "--epochs", "2", "--learning-rate", "0.01"]) == 2
    assert "learning_rate: stored 0.001, now 0.01" in capsys.readouterr().err
    assert sorted(p.name for p in (store / "checkpoints").iterdir()) == before


def test_commands_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["evaluate", "--store", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "nope"), "--store", "x"]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_bad_channels_flag_exits_with_usage(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--data", ".", "--store", "x", "--channels", "a,b"])
    assert "comma-separated channel numbers" in capsys.readouterr().err


def test_every_run_setting_has_one_flag_that_fills_it(tmp_path):
    # The flags are generated from the configurations' fields: each field but
    # the data folder is reachable, and parsing fills exactly that field.
    import dataclasses

    from dlfb_localization.cli import build_parser
    from dlfb_localization.nucleus.config import PredictConfig
    from dlfb_localization.runs import RunConfig
    from dlfb_localization.settings import from_flags

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for command, config_class in (("train", RunConfig), ("predict", PredictConfig)):
        dests = {action.dest for action in commands[command]._actions}
        fields = {f.name for f in dataclasses.fields(config_class)} - {"data"}
        assert fields <= dests, (command, sorted(fields - dests))

    flags = "--epochs 3 --no-standardize --ema-decay 0.9 --channels 0,1"
    flags += " --head-layers 3 --restart-dead-codes"
    run = ["train", "--data", str(tmp_path), "--store", str(tmp_path / "run")]
    args = parser.parse_args([*run, *flags.split()])
    config = from_flags(RunConfig, args, data=str(tmp_path))
    assert config == RunConfig(
        data=str(tmp_path),
        num_epochs=3,
        standardize_inputs=False,
        ema_decay=0.9,
        channels=(0, 1),
        classification_head_layers=3,
        restart_dead_codes=True,
    )
    defaults = parser.parse_args(["predict", "--data", "d", "--out", "o"])
    assert from_flags(PredictConfig, defaults, data="d") == PredictConfig(data="d")


def test_a_run_is_read_back_without_initialising_and_refuses_other_data(
    trained, tmp_path, monkeypatch
):
    import shutil

    import jax
    from conftest import write_tiny_release

    from dlfb_localization import runs
    from dlfb_localization.checkpoint import ConfigMismatchError

    _, store, exit_code = trained
    assert exit_code == 0
    config = runs.RunConfig.from_json(json.loads((store / "config.json").read_text()))
    resumed = runs.train_run(config, store, progress=False)  # restores, via train
    # The checkpoint records the run configuration whole (the data by its
    # fingerprint, not its path).
    from dlfb_localization import checkpoint

    manager = checkpoint.open_manager(store / "checkpoints")
    try:
        meta = checkpoint.read_meta(manager, manager.latest_step())
    finally:
        manager.close()
    assert meta["config"]["settings"] == config.settings()
    assert "data" not in meta["config"]["settings"] and meta["config"]["data"]

    # Only shapes are computed: the model is initialised on tracers, never on
    # values.
    create = runs.LocalizationModel.create_train_state

    def shapes_only(self, rng, *args, **kwargs):
        assert isinstance(rng, jax.core.Tracer), "load_run initialised a model"
        return create(self, rng, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(runs.LocalizationModel, "create_train_state", shapes_only)
        loaded = runs.load_run(store)
    assert loaded.state.model == resumed.state.model
    assert int(loaded.state.step) == int(resumed.state.step) > 0
    for a, b in zip(
        jax.tree.leaves((loaded.state.params, loaded.state.opt_state)),
        jax.tree.leaves((resumed.state.params, resumed.state.opt_state)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert loaded.metrics == resumed.metrics

    # The same run folder pointed at data with other pixels is refused.
    moved = tmp_path / "store"
    shutil.copytree(store, moved)
    write_tiny_release(tmp_path / "other", seed=1)
    stored = json.loads((moved / "config.json").read_text())
    stored["data"] = str(tmp_path / "other")
    (moved / "config.json").write_text(json.dumps(stored))
    with pytest.raises(ConfigMismatchError, match="other data"):
        runs.load_run(moved)
