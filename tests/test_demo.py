"""The main job (README's first command), on a shrunken sample and model."""

import json
import re

import pytest

from dlfb_localization import demo
from dlfb_localization.dataset.synthetic import SyntheticSpec
from dlfb_localization.demo_reuse import reuse


@pytest.fixture
def tiny_demo(monkeypatch):
    monkeypatch.setattr(
        demo,
        "EMBEDDED_SAMPLE",
        SyntheticSpec(n_proteins=8, fovs_per_protein=3, crops_per_fov=4, image_size=32),
    )
    monkeypatch.setattr(
        demo,
        "EVALUATION_SAMPLE",
        SyntheticSpec(
            n_proteins=12, fovs_per_protein=1, crops_per_fov=4, image_size=32, seed=1
        ),
    )
    monkeypatch.setattr(
        demo,
        "DEMO_TRAINING",
        {"embedding_dim": 8, "num_embeddings": 16, "batch_size": 8, "num_epochs": 2},
    )


@pytest.mark.slow
def test_demo_writes_every_figure_and_the_report(tiny_demo, tmp_path, capsys):
    report = demo.run(tmp_path / "run")
    out = tmp_path / "run"
    figures = {p.stem for p in (out / "figures").glob("*.png")}
    for model in ("with_head", "without_head"):
        for kind in (
            "reconstructions",
            "losses",
            "perplexity",
            "codebook",
            "feature_correlation",
            "feature_spectra",
        ):
            assert f"{kind}_{model}" in figures
    assert {"random_frames", "umap"} <= figures
    text = report.read_text()
    for figure in figures:
        assert f"figures/{figure}.png" in text
    # The interactive map is linked, not embedded as an image.
    page = (out / "figures" / "map.html").read_text(encoding="utf-8")
    assert "No ClassificationHead: proteins in the embedding" in page
    assert "[figures/map.html](figures/map.html)" in text
    assert "![map]" not in text
    # The settings of the demo's family, not the ViT's.
    training = next(line for line in text.splitlines() if line.startswith("Training:"))
    assert "num_embeddings=16" in training and "objective" not in training
    results = json.loads((out / "report.json").read_text())
    assert set(results) == {"untrained", "with_head", "without_head"}
    assert "| No ClassificationHead | codebook_histogram |" in text
    assert "| probe, macro-F1 | probe, macro AP | cluster score |" in text
    assert "\nProbe: " in text
    for result in results.values():
        assert set(result["probe"]) >= {"codebook_histogram", "mean_quantized"}
    assert "pixels_pca" in results["untrained"]["probe"]
    assert "These are one run's numbers (seed 42)" in text
    stages = r"data \d+ s, training \d+ s, evaluation and figures \d+ s"
    assert re.search(rf"Run took [0-9.]+ min \({stages}\)", text)
    assert str(report.resolve()) in capsys.readouterr().out

    # A second run restores both models instead of training them again, and
    # reuses what they give; an evaluation whose record is gone is computed
    # again, and gives the same numbers.
    steps = {
        m: sorted(p.name for p in (out / "runs" / m / "checkpoints").iterdir())
        for m in ("with_head", "without_head")
    }
    (out / "evaluation" / "with_head.json.inputs.json").unlink()
    figure_times = {p: p.stat().st_mtime_ns for p in (out / "figures").glob("*.png")}
    demo.run(out)
    printed = capsys.readouterr()
    assert "Epoch 1" not in printed.err
    assert f"reused {out / 'data'} and {out / 'evaluation_data'}" in printed.out
    for model in ("untrained", "without_head"):
        assert f"{model}: reused {out / 'evaluation' / model}.json" in printed.out
    assert "with_head: reused" not in printed.out
    assert f"reused {out / 'figures'} (same models and data)" in printed.out
    assert {
        p: p.stat().st_mtime_ns for p in (out / "figures").glob("*.png")
    } == figure_times
    for model, names in steps.items():
        assert (
            sorted(p.name for p in (out / "runs" / model / "checkpoints").iterdir())
            == names
        )
    assert json.loads((out / "report.json").read_text()) == results


def test_a_failed_training_stops_the_demo_before_the_untrained_evaluation(
    tiny_demo, tmp_path, monkeypatch
):
    """The untrained evaluation is queued behind the trainings, on the thread
    that a finished (or failed) one frees; after a failure it computes
    nothing, and the demo stops with the training's error."""
    from dlfb_localization.train import NonFiniteLossError

    def train_run(config, folder):
        raise NonFiniteLossError(f"{folder.name} diverged")

    evaluated = []
    monkeypatch.setattr(demo, "train_run", train_run)
    monkeypatch.setattr(
        demo, "get_frame_embeddings", lambda *args: evaluated.append(args)
    )
    with pytest.raises(NonFiniteLossError, match="with_head diverged"):
        demo.run(tmp_path / "run")
    assert evaluated == []
    assert not (tmp_path / "run" / "evaluation").exists()


def test_an_evaluation_stored_before_the_probe_is_computed_again(tmp_path):
    path = tmp_path / "model.json"
    inputs = {"params_sha256": "0" * 64, "data": "f", "version": "v"}
    result = {
        "labels": {"all": {}, "probe": {}},
        "knn": {},
        "probe": {},
        "cluster_score": {},
        "codebook": {},
    }
    path.write_text(json.dumps(result))
    (tmp_path / "model.json.inputs.json").write_text(json.dumps(inputs))
    assert reuse(path, inputs) == result
    assert reuse(path, {**inputs, "version": "w"}) is None
    del result["probe"]
    path.write_text(json.dumps(result))
    assert reuse(path, inputs) is None
