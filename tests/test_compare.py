"""`compare`: model families trained on one folder and scored on the same
unseen proteins, over seeds, with equal training time."""

import json

import matplotlib.image
import numpy as np
import pytest
from conftest import write_tiny_release

from dlfb_localization import compare as compare_module
from dlfb_localization.cli import main
from dlfb_localization.compare import compare, epochs_for
from dlfb_localization.compare_summary import summarise
from dlfb_localization.dataset.builder import DatasetBuilder
from dlfb_localization.evaluate import compute_pixel_pca, score_localization

# The test suite's tiny sizes (tests/test_cli.py's and tests/test_vit_run.py's),
# so that their compiled programs are reused: 16x16 crops in 4x4 patches, P x K
# = 2 x 4 crops a ViT batch, 8 frames a VQ-VAE batch.
TINY = {
    "embedding_dim": 8,
    "num_embeddings": 16,
    "batch_size": 8,
    "patch_size": 4,
    "proteins_per_batch": 2,
    "crops_per_protein": 4,
}
# One candidate of each kind; the ViT with its cheapest objective to compile.
CANDIDATES = ("pixels", "untrained", "chapter", "vit-mae")
SEEDS = (0, 1)
# 60 microseconds: one epoch (the least), as no epoch of these runs is faster
# than 40 microseconds (which would round to two).
MINUTES = 1e-6


def test_epochs_for_spends_the_minutes_in_whole_epochs():
    assert epochs_for(2.0, 30.0) == 4
    assert epochs_for(2.0, 50.0) == 2  # 2.4 epochs
    assert epochs_for(0.1, 600.0) == 1  # at least one
    with pytest.raises(ValueError, match="minutes"):
        epochs_for(0.0, 1.0)


def test_summarise_gives_mean_and_sample_spread_of_defined_values():
    summary = summarise([0.5, None, 0.7])
    assert summary["mean"] == pytest.approx(0.6)
    assert summary["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert summary["n"] == 2 and summary["values"] == [0.5, None, 0.7]
    assert summarise([0.4])["std"] is None
    assert summarise([None])["mean"] is None


def test_compare_trains_scores_over_seeds_and_restores_on_rerun(
    module_tiny_release, tmp_path, monkeypatch
):
    data = module_tiny_release[0]
    eval_data = tmp_path / "unseen"
    write_tiny_release(eval_data, n_proteins=8, fovs_per_protein=2, seed=1)
    out = tmp_path / "compare"
    result = compare(
        data,
        eval_data,
        out,
        candidates=CANDIDATES,
        seeds=SEEDS,
        minutes=MINUTES,
        common=TINY,
    )

    # Every candidate's embeddings, scored for each seed.
    assert list(result["scores"]) == list(CANDIDATES)
    assert list(result["scores"]["pixels"]) == ["pixels_pca"]
    assert list(result["scores"]["chapter"]) == ["codebook_histogram", "mean_quantized"]
    assert list(result["scores"]["vit-mae"]) == ["attention_pooled"]
    for embeddings in result["scores"].values():
        for metrics in embeddings.values():
            for summary in metrics.values():
                values = [v for v in summary["values"] if v is not None]
                assert len(summary["values"]) == len(SEEDS)
                if values:
                    assert summary["mean"] == pytest.approx(np.mean(values))
                if len(values) > 1:
                    assert summary["std"] == pytest.approx(np.std(values, ddof=1))

    # The numbers are the evaluator's: seed 1's pixel baseline, recomputed.
    split = DatasetBuilder(eval_data).build(rng=0, splits={"evaluation": 1.0})[
        "evaluation"
    ]
    features = {"pixels_pca": compute_pixel_pca(split, random_state=1)["features"]}
    expected = score_localization(split, features, random_state=1)
    pixels = result["scores"]["pixels"]["pixels_pca"]
    assert pixels["probe_macro_ap"]["values"][1] == pytest.approx(
        expected["probe"]["pixels_pca"]["macro_average_precision"]
    )
    assert pixels["knn_accuracy"]["values"][1] == pytest.approx(
        expected["knn"]["protein"]["all"]["pixels_pca"]["accuracy"]
    )
    assert result["n_proteins"] == 8

    # The epochs spend the minutes at the timed rate: one epoch each here.
    for name in ("chapter", "vit-mae"):
        info = result["candidates"][name]
        assert info["epochs"] == epochs_for(MINUTES, info["seconds_per_epoch"]) == 1
        assert all(s > 0 for s in info["training_seconds"])
        for seed in SEEDS:
            config = json.loads(
                (out / "runs" / name / f"seed{seed}" / "config.json").read_text()
            )
            assert config["seed"] == seed and config["num_epochs"] == 1
    assert "epochs" not in result["candidates"]["untrained"]
    assert json.loads((out / "compare.json").read_text()) == result
    table = (out / "compare.md").read_text()
    assert "| ViT, MAE | attention_pooled | 1 |" in table
    assert "±" in table
    image = matplotlib.image.imread(out / "compare.png")
    assert image.shape[0] > 100 and image.shape[1] > 400

    # Run again: the calibration and the runs are reused, the numbers repeat.
    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated again")

    monkeypatch.setattr(compare_module, "calibrate", no_calibration)
    again = compare(
        data,
        eval_data,
        out,
        candidates=("chapter",),
        seeds=SEEDS,
        minutes=MINUTES,
        common=TINY,
    )
    assert again["scores"]["chapter"] == result["scores"]["chapter"]
    assert again["candidates"]["chapter"] == result["candidates"]["chapter"]


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"candidates": ("chapter", "resnet")}, "unknown candidate"),
        ({"candidates": ("chapter", "chapter")}, "repeated"),
        ({"seeds": ()}, "at least one seed"),
        ({"seeds": (0, 0)}, "repeated"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"minutes": 0.0}, "minutes must be > 0"),
    ],
)
def test_compare_refuses_bad_arguments_before_writing(
    module_tiny_release, tmp_path, arguments, message
):
    data = module_tiny_release[0]
    with pytest.raises(ValueError, match=message):
        compare(data, data, tmp_path / "out", **arguments)
    assert not (tmp_path / "out").exists()


def test_compare_refuses_unseen_crops_of_another_size(module_tiny_release, tmp_path):
    other = tmp_path / "other"
    write_tiny_release(other, size=20, seed=1)
    with pytest.raises(ValueError, match=r"\(20, 20, 1\).*\(16, 16, 1\)"):
        compare(module_tiny_release[0], other, tmp_path / "out", epochs=1)
    assert not (tmp_path / "out").exists()


def test_compare_command_names_a_missing_folder(module_tiny_release, tmp_path, capsys):
    data = module_tiny_release[0]
    code = main(
        [
            "compare",
            "--data",
            str(data),
            "--eval-data",
            str(tmp_path / "nowhere"),
            "--out",
            str(tmp_path / "out"),
            "--seeds",
            "0",
            "--epochs",
            "1",
        ]
    )
    assert code == 1
    assert "nowhere" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
