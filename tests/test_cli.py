"""The `dlfb-localization` command line."""

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import latest_checkpoint_meta, write_tiny_release

from dlfb_localization.cli import main
from dlfb_localization.commands import probe_summary


def test_prepare_builds_the_cache(tiny_release, capsys):
    path, _, _ = tiny_release
    assert (
        main(["prepare", str(path), "--channels", "0,1", "--cache-dtype", "float16"])
        == 0
    )
    assert (path / "dlfb_cache" / "images_c0-1_f16.npy").exists()
    assert "72 frames, 6 proteins" in capsys.readouterr().out


def test_bad_path_is_a_clear_error_with_exit_1(tmp_path, capsys):
    assert main(["prepare", str(tmp_path / "missing")]) == 1
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
    (train command line without --epochs, run folder, exit code).

    It is trained from the data's parent folder with relative --data and
    --cache-dir, as a user would type them; the returned command line names
    the same folders by absolute paths."""
    path, _, _ = module_tiny_release
    store = tmp_path_factory.mktemp("runs") / "run"
    relative = ["--data", path.name, "--cache-dir", "cache"]
    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        exit_code = main(
            ["train", *relative, "--store", str(store), *TINY_MODEL, "--epochs", "2"]
        )
    finally:
        os.chdir(cwd)
    absolute = ["--data", str(path), "--cache-dir", str(path.parent / "cache")]
    return ["train", *absolute, "--store", str(store), *TINY_MODEL], store, exit_code


def test_the_probe_summary_gives_chance_and_what_was_left_out():
    result = {
        "labels": {
            "probe": {
                "n_classes_scored": 2,
                "n_splits": 5,
                "excluded_classes": {"centrosome": 1},
                "chance_average_precision": 0.25,
                "reason": None,
            }
        },
        "probe": {
            "codebook_histogram": {"macro_f1": 0.5, "macro_average_precision": 0.75},
            "pixels_pca": {"macro_f1": 0.125, "macro_average_precision": 0.375},
        },
    }
    assert probe_summary(result) == (
        "protein-level probe (2 grade 1-2 localizations, 5-fold, 1 too rare left "
        "out): macro AP codebook_histogram 0.750, pixels_pca 0.375 (chance 0.250); "
        "macro-F1 codebook_histogram 0.500, pixels_pca 0.125"
    )


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
    # Six proteins are too few for the probe: it says why instead of a number.
    reason = result["labels"]["probe"]["reason"]
    assert f"protein-level probe: undefined ({reason})" in printed.out
    assert "evaluating: 100%" in printed.err
    assert result["knn"]["protein"]["all"]["codebook_histogram"] is not None

    out = tmp_path / "embeddings"
    assert (
        main(["embed", "--store", str(store), "--split", "train", "--out", str(out)])
        == 0
    )
    arrays = np.load(out / "train.npz")
    assert arrays["frame_histograms"].shape[1] == 16
    assert (out / "train_frames.h5ad").is_file()
    assert (out / "train_proteins.h5ad").is_file()
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
    page = (figures / "map.html").read_text(encoding="utf-8")
    assert "<title>run: proteins in the embedding</title>" in page
    assert f"wrote {figures / 'map.html'}" in capsys.readouterr().out


def test_training_counts_steps_and_a_rerun_says_it_restores(
    module_tiny_release, tmp_path, capsys
):
    path, _, _ = module_tiny_release
    train = ["train", "--data", str(path), "--store", str(tmp_path / "run")]
    train += ["--cache-dir", str(tmp_path / "cache")]  # the release stays as it is
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
    assert main([*train, "--epochs", "2", "--learning-rate", "0.01"]) == 1
    assert "learning_rate: stored 0.001, now 0.01" in capsys.readouterr().err
    assert sorted(p.name for p in (store / "checkpoints").iterdir()) == before


def test_commands_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["evaluate", "--store", str(tmp_path)]) == 1
    assert "is not a run folder" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "nope"), "--store", "x"]) == 1
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
    from dlfb_localization.model import LocalizationModel

    _, store, exit_code = trained
    assert exit_code == 0
    config = runs.RunConfig.from_json(json.loads((store / "config.json").read_text()))
    resumed = runs.train_run(config, store, progress=False)  # restores, via train
    # The checkpoint records the run configuration whole (the data by its
    # fingerprint, not its path).
    meta = latest_checkpoint_meta(store / "checkpoints")
    assert meta["config"]["settings"] == config.settings()
    assert "data" not in meta["config"]["settings"] and meta["config"]["data"]

    # Only shapes are computed: the model is initialised on tracers, never on
    # values.
    create = LocalizationModel.create_train_state

    def shapes_only(self, rng, *args, **kwargs):
        assert isinstance(rng, jax.core.Tracer), "load_run initialised a model"
        return create(self, rng, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(LocalizationModel, "create_train_state", shapes_only)
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


# Errors a user can act on -----------------------------------------------------


def _error_line(capsys) -> str:
    """stderr's last line, after checking it holds no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_an_error_is_one_line_and_debug_shows_the_traceback(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("DLFB_DEBUG", raising=False)
    assert main(["evaluate", "--store", str(tmp_path)]) == 1
    line = _error_line(capsys)
    assert line.startswith("dlfb-localization: error: ") and str(tmp_path) in line

    assert main(["--debug", "evaluate", "--store", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "is not a run folder" in err.splitlines()[-1]
    monkeypatch.setenv("DLFB_DEBUG", "1")
    assert main(["evaluate", "--store", str(tmp_path)]) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("error", "exit_code", "message"),
    [
        (RuntimeError("boom\nmore"), 1, "error: unexpected RuntimeError: boom; run"),
        (OSError(errno.ENOSPC, "No space left on device", "/x/y"), 1, "disk is full"),
        (KeyboardInterrupt(), 130, "dlfb-localization: interrupted"),
    ],
)
def test_unexpected_errors_full_disks_and_interrupts_end_in_one_line(
    error, exit_code, message, capsys, monkeypatch
):
    from dlfb_localization import commands

    def fail(args):
        raise error

    monkeypatch.delenv("DLFB_DEBUG", raising=False)
    monkeypatch.setattr(commands, "prepare", fail)
    assert main(["prepare", "x"]) == exit_code
    assert message in _error_line(capsys)


def test_small_mistakes_get_messages_that_say_what_to_do(tiny_release, capsys):
    path, _, _ = tiny_release
    file = path / "Label_data00.csv"
    assert main(["prepare", str(file)]) == 1
    assert f"{file} is a file, not a folder" in _error_line(capsys)
    assert main(["train", "--data", str(file), "--store", "x"]) == 1
    assert "is not a folder (a file)" in _error_line(capsys)
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", str(path), "--channels", "0,0"])
    assert exit_info.value.code == 2
    assert "repeated in '0,0'" in capsys.readouterr().err
    assert not (path / "dlfb_cache").exists()


def test_demo_says_what_it_will_do_where_and_how_long_before_starting(
    tmp_path, capsys, monkeypatch
):
    from dlfb_localization import demo

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "write_release", interrupt)
    monkeypatch.chdir(tmp_path)
    assert main(["demo"]) == 130
    plan = capsys.readouterr().out.split("[1/5]")[0]
    assert str(tmp_path / "runs" / "demo") in plan
    assert "minutes" in plan and "trains the chapter's model" in plan


def test_train_on_huge_pixels_names_the_file_and_frame_without_standardizing(
    tiny_release, tmp_path, capsys
):
    path, images, _ = tiny_release
    block = images[:36].copy()
    block[7, 2, 2, 0] = 1e30  # finite, but its square overflows float32
    np.save(path / "Image_data00.npy", block)
    store = tmp_path / "run"
    train = ["train", "--data", str(path), "--store", str(store), "--no-standardize"]
    assert main([*train, *TINY_MODEL, "--epochs", "1"]) == 1
    line = _error_line(capsys)
    assert f"{path / 'Image_data00.npy'}: frame 7" in line
    assert "protein GENE0" in line and "magnitude 1e+30" in line
    assert not (store / "checkpoints").exists()


def test_a_full_disk_while_checkpointing_names_the_folder_in_one_line(
    trained, tmp_path, capsys, caplog, monkeypatch
):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    async def disk_full(self, item, directory):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(
        json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", disk_full
    )
    train, _, _ = trained
    data_and_cache = train[1:5]
    store = tmp_path / "run"
    command = ["train", *data_and_cache, "--store", str(store), *TINY_MODEL]
    monkeypatch.delenv("DLFB_DEBUG", raising=False)
    with caplog.at_level(logging.ERROR, logger="absl"):
        assert main([*command, "--epochs", "1"]) == 1
    line = _error_line(capsys)
    assert f"into {store / 'checkpoints'}" in line and "No space left" in line
    orbax_errors = [r for r in caplog.records if r.name == "absl"]
    assert orbax_errors and all(r.exc_info is None for r in orbax_errors)


def test_figures_refuses_runs_trained_on_frames_of_other_shapes(
    tmp_path, capsys, monkeypatch
):
    from dlfb_localization import runs
    from dlfb_localization.dataset import Dataset

    def fake_run(store, progress, data):
        channels = 2 if store.name == "two" else 1
        split = Dataset.from_arrays(np.zeros((4, 16, 16, channels)), np.arange(4))
        return runs.Run(None, {"test": split}, None, None, None)

    monkeypatch.setattr(runs, "load_run", fake_run)
    stores = ["--store", str(tmp_path / "one"), "--store", str(tmp_path / "two")]
    assert main(["figures", *stores, "--out", str(tmp_path / "figs")]) == 1
    line = _error_line(capsys)
    assert "one and two" in line and "(16, 16, 1) and (16, 16, 2)" in line
    assert not (tmp_path / "figs").exists()


# Runs that travel, and damaged checkpoints --------------------------------------


def _copy_run(store: Path, to: Path, **config) -> Path:
    """A copy of the run folder `store` at `to`, with `config` changed in its
    config.json."""
    shutil.copytree(store, to)
    stored = json.loads((to / "config.json").read_text())
    (to / "config.json").write_text(json.dumps({**stored, **config}))
    return to


def test_a_run_records_absolute_paths_and_is_read_where_its_data_moved(
    trained, tmp_path, capsys, monkeypatch
):
    from conftest import write_tiny_release

    from dlfb_localization import runs
    from dlfb_localization.checkpoint import ConfigMismatchError

    _, store, exit_code = trained
    assert exit_code == 0
    config = json.loads((store / "config.json").read_text())
    data = Path(config["data"])  # trained as "--data release --cache-dir cache"
    assert data.is_absolute() and data.name == "release"
    assert config["cache_dir"] == str(data.parent / "cache")
    assert not (data / "dlfb_cache").exists()

    # Copies of the data and of the run, then both moved.
    shutil.copytree(data, tmp_path / "data")
    cache = str(tmp_path / "cache")
    _copy_run(store, tmp_path / "run", data=str(tmp_path / "data"), cache_dir=cache)
    moved_data = (tmp_path / "data").rename(tmp_path / "moved_data")
    moved_run = (tmp_path / "run").rename(tmp_path / "moved_run")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    evaluate = ["evaluate", "--store", "../moved_run", "--split", "train"]

    assert main(evaluate) == 1
    line = _error_line(capsys)
    assert f"data folder {tmp_path / 'data'} of the run" in line and "--data" in line
    assert main([*evaluate, "--data", "../moved_data"]) == 0
    result = json.loads((moved_run / "evaluation_train.json").read_text())
    assert result["n_proteins"] == 6

    # Other data is refused, naming the difference.
    write_tiny_release(tmp_path / "other", seed=1)
    assert main([*evaluate, "--data", str(tmp_path / "other")]) == 1
    line = _error_line(capsys)
    assert "trained on other data" in line and "data.train: stored" in line
    write_tiny_release(tmp_path / "larger", size=20)
    with pytest.raises(ConfigMismatchError, match="frames of 16x16 pixels with 1"):
        runs.load_run(moved_run, data=tmp_path / "larger")

    # A run written before paths were absolute names its data as typed: it is
    # found from the working directory, else beside the run folder.
    _copy_run(moved_run, tmp_path / "old_run", data="moved_data")
    assert runs.load_run(tmp_path / "old_run").config.data == str(moved_data)


def _step_folders(store: Path) -> list[Path]:
    steps = [p for p in (store / "checkpoints").iterdir() if p.name.isdigit()]
    return sorted(steps, key=lambda p: int(p.name))


def test_a_damaged_latest_checkpoint_falls_back_with_a_warning_or_is_refused(
    trained, tmp_path, capsys, caplog
):
    from dlfb_localization import runs
    from dlfb_localization.checkpoint import DamagedCheckpointError

    _, store, exit_code = trained
    assert exit_code == 0
    run = _copy_run(store, tmp_path / "run")
    older, newest = _step_folders(run)
    meta = newest / "meta" / "metadata"
    meta.write_text(meta.read_text()[:21])  # "Expecting value: line 1 column 22"

    with caplog.at_level(logging.WARNING):
        loaded = runs.load_run(run)
    assert int(loaded.state.step) == int(older.name)
    assert f"{run / 'checkpoints'}: step {newest.name} is damaged" in caplog.text
    assert loaded.metrics["train"]["total_loss"][-1]["epoch"] == 0

    # (Garbled JSON rather than a truncated array: a failed array read leaves
    # Orbax coroutines that later tests would report; test_checkpoint covers
    # truncated arrays.)
    meta = older / "meta" / "metadata"
    meta.write_text(meta.read_text()[:21])
    with pytest.raises(DamagedCheckpointError, match=f"{run / 'checkpoints'}: no"):
        runs.load_run(run)
    assert main(["evaluate", "--store", str(run)]) == 1
    line = _error_line(capsys)
    assert f"{run / 'checkpoints'}: no checkpoint can be read" in line
    assert f"step(s) {newest.name}, {older.name} damaged" in line


def test_embed_writes_every_frame_of_a_folder_the_run_never_saw(trained, tmp_path):
    import anndata

    _, store, exit_code = trained
    assert exit_code == 0
    new = tmp_path / "new_proteins"
    _, labels = write_tiny_release(new, n_proteins=3, frames_per_fov=2, seed=7)
    out = tmp_path / "embeddings"

    command = ["embed", "--store", str(store), "--data", str(new), "--out", str(out)]
    assert main(command) == 0
    arrays = np.load(out / "new_proteins.npz")
    # Every frame of the new folder, in its order, whatever the run's splits.
    assert arrays["frame_ids"].tolist() == list(range(len(labels)))
    assert arrays["frame_histograms"].shape == (len(labels), 16)
    assert (arrays["frame_histograms"].sum(axis=1) == 4 * 4).all()
    frames = anndata.read_h5ad(out / "new_proteins_frames.h5ad")
    proteins = anndata.read_h5ad(out / "new_proteins_proteins.h5ad")
    assert frames.shape == (len(labels), 16)
    assert frames.obs["name"].tolist() == labels["name"].tolist()
    assert frames.obs["fov_id"].tolist() == labels["FOV_id"].tolist()
    assert proteins.n_obs == 3
    assert proteins.obs["name"].tolist() == ["GENE0", "GENE1", "GENE2"]
    assert proteins.obs["n_frames"].tolist() == [6, 6, 6]
    assert proteins.obsm["X_mean_quantized"].shape == (3, 8)


def test_embed_refuses_new_data_of_another_crop_size_naming_both(
    trained, tmp_path, capsys
):
    _, store, exit_code = trained
    assert exit_code == 0
    new = tmp_path / "bigger"
    write_tiny_release(new, n_proteins=2, size=20)
    out = tmp_path / "embeddings"
    command = ["embed", "--store", str(store), "--data", str(new), "--out", str(out)]
    capsys.readouterr()
    assert main(command) == 1
    error = capsys.readouterr().err
    assert "20x20 pixels with 1 channel(s)" in error
    assert "trained on crops of 16x16 pixels with 1 channel(s)" in error
    # --split names one of the run's own splits, which new data does not have.
    assert main([*command, "--split", "train"]) == 1
    assert "drop --split" in capsys.readouterr().err
    assert not out.exists()
