"""Model families side by side: trained on one data folder, scored on the same
unseen proteins, over several seeds. What a user runs to choose a model.

`compare` trains (or restores) one run per candidate and seed, each family for
about the same CPU time (unless told the epochs), and scores every embedding
it gives, beside raw pixels and an untrained model, on a second data folder of
proteins the runs never saw: protein-level k-NN of the predominant
localization and the multi-label probe (`evaluate.score_localization`). It
writes one table (`compare.md`, `compare.json`) and one figure
(`compare.png`), each number a mean and standard deviation over the seeds.

Equal time, not equal epochs: a ViT step and a VQ-VAE step cost different
amounts, and a user has minutes to spend, not epochs. Each trained candidate's
epochs are `round(minutes * 60 / seconds per epoch)` (at least one), its
seconds per epoch timed once on its compiled training step (`calibrate`) and
kept in `calibration.json`, so that a rerun trains (or restores) the same runs.
The table gives the epochs and the measured training time of each.
"""

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dlfb_localization.compare_summary import METRICS, format_table, summarise_scores
from dlfb_localization.dataset import Dataset
from dlfb_localization.dataset.builder import DatasetBuilder
from dlfb_localization.embeddings import get_frame_embeddings, named_features
from dlfb_localization.evaluate import compute_pixel_pca
from dlfb_localization.figures import save_figure
from dlfb_localization.files import write_json, write_text
from dlfb_localization.inspect.compare import plot_comparison
from dlfb_localization.localization import score_localization
from dlfb_localization.locks import lock_folder
from dlfb_localization.loop import DataParallel
from dlfb_localization.run_config import RunConfig
from dlfb_localization.run_families import MODELS
from dlfb_localization.runs import build_splits, create_state, train_run
from dlfb_localization.train import model_microbatches, train_step

__all__ = [
    "CANDIDATES",
    "COMMON",
    "DEFAULT_CANDIDATES",
    "Candidate",
    "calibrate",
    "compare",
    "epochs_for",
]


class Candidate(NamedTuple):
    """One row group of the comparison.

    Attributes:
      title: how the table names it.
      settings: `RunConfig` fields over `COMMON` (none for "pixels").
      trained: train it (else it is scored as initialised).
    """

    title: str
    settings: Mapping[str, Any] | None
    trained: bool = True


# Every candidate the comparison knows. The VQ-VAEs' head weighs 0.1, as in the
# demo (at the chapter's 1 it memorises the demo's 40 training proteins); the
# ViT trains with its family's optimizer and, with the protein task, P x K
# batches of the same 32 frames as the others' batches.
CANDIDATES: dict[str, Candidate] = {
    "pixels": Candidate("raw pixels (PCA)", None, trained=False),
    "untrained": Candidate(
        "untrained chapter model", {"model": "chapter"}, trained=False
    ),
    "chapter": Candidate(
        "chapter's VQ-VAE", {"model": "chapter", "classification_weight": 0.1}
    ),
    "cytoself": Candidate(
        "full cytoself", {"model": "cytoself", "classification_weight": 0.1}
    ),
    "d4": Candidate(
        "chapter's VQ-VAE, D4 encoder",
        {"model": "chapter", "encoder": "d4", "classification_weight": 0.1},
    ),
    "vit-mae": Candidate("ViT, MAE", {"model": "vit", "objective": "mae"}),
    "vit-protein": Candidate(
        "ViT, protein contrastive", {"model": "vit", "objective": "protein"}
    ),
    "vit-subcell": Candidate(
        "ViT, SubCell's three tasks", {"model": "vit", "objective": "subcell"}
    ),
}
DEFAULT_CANDIDATES = tuple(CANDIDATES)
# The settings every candidate shares: the demo's sizes (`demo.DEMO_TRAINING`),
# each applying to the families it names (`run_config`).
COMMON: dict[str, Any] = {
    "embedding_dim": 32,
    "num_embeddings": 512,
    "batch_size": 32,
    "proteins_per_batch": 8,
    "crops_per_protein": 4,
}
_CALIBRATION_FILE = "calibration.json"
_TRAINING_FILE = "training_seconds.json"
# Steps timed after the compiling one; their mean sets seconds per step.
_TIMED_STEPS = 4


def epochs_for(minutes: float, seconds_per_epoch: float) -> int:
    """The whole epochs closest to `minutes` of training, at least one."""
    if not minutes > 0:
        raise ValueError(f"minutes must be > 0, got {minutes}")
    if not seconds_per_epoch > 0:
        raise ValueError(f"seconds_per_epoch must be > 0, got {seconds_per_epoch}")
    return max(1, round(minutes * 60 / seconds_per_epoch))


def calibrate(config: RunConfig, steps: int = _TIMED_STEPS) -> dict[str, float]:
    """Seconds per training epoch of the run `config` on this machine.

    Builds the run's splits, initial state and training batches as
    `runs.train_run` does, compiles `train.train_step` on the first batch (on
    the devices as `train` places it, so the run then reuses the program) and
    times `steps` more (on the device, waiting for each result), then scales
    to one epoch's steps. Validation and checkpoints, a few percent of an
    epoch, are not counted.

    Returns:
      `{"seconds_per_epoch", "seconds_per_step", "steps_per_epoch",
      "compile_seconds"}`.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    splits = build_splits(config)
    state = create_state(config, splits)
    plan = MODELS[config.model].train_batches(config, splits["train"])
    key = jax.random.PRNGKey(config.seed)
    if plan.batches is None:
        epoch = splits["train"].get_batches(key, plan.batch_size)
    else:
        epoch = plan.batches(key)
    # Placed as `loop.fit` places them, so that the step compiled here is the
    # program the run's training then reuses instead of compiling its own.
    parallel = DataParallel()
    state = parallel.place_state(state)
    sharding = parallel.batch_sharding(plan.batch_size)
    batches = [
        jax.device_put({"images": b["images"], "labels": b["labels"]}, sharding)
        for b in epoch
    ]
    microbatches = model_microbatches(state, plan.batch_size, parallel.n_devices)
    weight = jnp.float32(config.classification_weight)

    def step(state, batch):
        state, metrics = train_step(
            state, batch, key, weight, microbatches, config.augment
        )
        jax.block_until_ready(metrics)
        return state

    start = time.perf_counter()
    state = step(state, batches[0])
    compiled = time.perf_counter()
    for i in range(steps):
        state = step(state, batches[(i + 1) % len(batches)])
    per_step = (time.perf_counter() - compiled) / steps
    return {
        "seconds_per_epoch": per_step * len(batches),
        "seconds_per_step": per_step,
        "steps_per_epoch": len(batches),
        "compile_seconds": compiled - start,
    }


def _config(
    candidate: Candidate, data: Path, seed: int, epochs: int, common: Mapping
) -> RunConfig:
    return RunConfig(
        data=str(data),
        seed=seed,
        num_epochs=epochs,
        **{**common, **candidate.settings},
    )


def _calibration_key(candidate: Candidate, common: Mapping, minutes: float) -> dict:
    """What a stored calibration must match to be reused."""
    return {"settings": {**common, **candidate.settings}, "minutes": minutes}


def _plan_epochs(
    names: Sequence[str],
    data: Path,
    seed: int,
    minutes: float,
    epochs: int | None,
    common: Mapping,
    out: Path,
) -> dict[str, dict]:
    """`{candidate: {"epochs", ...calibration}}` of the trained candidates:
    `epochs` for every one if given, else calibrated to `minutes` (reusing
    `calibration.json` where it was made for the same settings and minutes)."""
    path = out / _CALIBRATION_FILE
    stored = json.loads(path.read_text()) if path.is_file() else {}
    plans = {}
    for name in names:
        candidate = CANDIDATES[name]
        if not candidate.trained:
            continue
        if epochs is not None:
            plans[name] = {"epochs": epochs}
            continue
        key = _calibration_key(candidate, common, minutes)
        if stored.get(name, {}).get("key") == key:
            plans[name] = stored[name]["plan"]
            continue
        print(f"  timing {name}'s training step", flush=True)
        timing = calibrate(_config(candidate, data, seed, 1, common))
        plans[name] = {
            "epochs": epochs_for(minutes, timing["seconds_per_epoch"]),
            **timing,
        }
        stored[name] = {"key": key, "plan": plans[name]}
        write_json(stored, path)
    return plans


def _evaluation_split(eval_data: Path, channels: Sequence[int]) -> Dataset:
    return DatasetBuilder(eval_data, channels=channels).build(
        rng=0, splits={"evaluation": 1.0}
    )["evaluation"]


def compare(
    data: str | Path,
    eval_data: str | Path,
    out: str | Path,
    *,
    candidates: Sequence[str] = DEFAULT_CANDIDATES,
    seeds: Sequence[int] = (0, 1, 2),
    minutes: float = 2.0,
    epochs: int | None = None,
    common: Mapping[str, Any] = COMMON,
    k: int = 5,
) -> dict:
    """Trains (or restores) and scores `candidates` over `seeds`.

    Args:
      data: the folder every candidate trains on (the runs' fov-exclusive
        splits).
      eval_data: a folder of proteins none of the runs saw (e.g. the demo's
        `evaluation_data`); every candidate is scored on all of its frames.
      out: the comparison's folder: `runs/<candidate>/seed<seed>/` (run
        folders, restored when run again), `evaluation/<candidate>_seed<seed>
        .json`, `calibration.json`, `training_seconds.json`, `compare.json`,
        `compare.md` and `compare.png`. Locked while written.
      candidates: names in `CANDIDATES`, in the table's order.
      seeds: each candidate's runs (splits, weights, batches; the probe's
        folds and the pixels' PCA use the same seed).
      minutes: training time per trained run, on this machine (`calibrate`).
      epochs: train every candidate this many epochs instead.
      common: settings of every run (`COMMON`), under each candidate's own.
      k: neighbours of the protein-level k-NN.

    Returns:
      What `compare.json` holds: `settings`, `candidates[name]` (title,
      settings, epochs, training seconds per seed), `scores[name][embedding]
      [metric]` (`compare_summary.summarise` over seeds) and `chance[metric]`
      (the majority class's k-NN accuracy, the probe's chance macro-F1 and
      macro AP).

    Raises:
      ValueError: an unknown candidate, no seeds, a repeated seed or
        candidate, minutes or epochs below one, or `eval_data`'s frames of
        another shape than `data`'s; nothing is written to `out`.
      locks.FolderLockedError: another process is writing `out`.
    """
    data, eval_data, out = Path(data), Path(eval_data), Path(out)
    _check_arguments(candidates, seeds, minutes, epochs)
    for folder, flag in ((data, "data"), (eval_data, "eval_data")):
        if not folder.is_dir():
            raise FileNotFoundError(f"{flag} folder {folder} does not exist")
    channels = RunConfig(data=str(data), **common).channels
    split = _evaluation_split(eval_data, channels)
    trained_on = DatasetBuilder(data, channels=channels).images.frame_shape
    if split.image_shape != trained_on:
        raise ValueError(
            f"eval_data {eval_data} holds frames of {split.image_shape} (height, "
            f"width, channels) but data {data} holds {trained_on}: score on crops "
            "of the size the models train on"
        )
    with lock_folder(out):
        plans = _plan_epochs(candidates, data, seeds[0], minutes, epochs, common, out)
        timing_path = out / _TRAINING_FILE
        timings = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
        results: dict[str, list[dict]] = {name: [] for name in candidates}
        for seed in seeds:
            for name in candidates:
                candidate = CANDIDATES[name]
                print(f"seed {seed}: {name}", flush=True)
                scores = _score_candidate(
                    candidate, name, data, seed, plans, common, split, k, out, timings
                )
                write_json(scores, out / "evaluation" / f"{name}_seed{seed}.json")
                results[name].append(scores)
                write_json(timings, timing_path)
        result = _collect(candidates, seeds, plans, results, timings)
        result["settings"] = {
            "data": str(data.absolute()),
            "eval_data": str(eval_data.absolute()),
            "seeds": list(seeds),
            "minutes": None if epochs is not None else minutes,
            "epochs": epochs,
            "common": dict(common),
            "k": k,
        }
        write_json(result, out / "compare.json")
        write_text(format_table(result), out / "compare.md")
        save_figure(plot_comparison(result, METRICS), out / "compare.png")
    return result


def _check_arguments(candidates, seeds, minutes, epochs) -> None:
    unknown = [name for name in candidates if name not in CANDIDATES]
    if unknown:
        raise ValueError(
            f"unknown candidate(s) {unknown}; choose from {list(CANDIDATES)}"
        )
    if not candidates:
        raise ValueError("name at least one candidate")
    if len(set(candidates)) < len(candidates):
        raise ValueError(f"candidate(s) repeated in {list(candidates)}")
    if not seeds:
        raise ValueError("name at least one seed")
    if len(set(seeds)) < len(seeds):
        raise ValueError(f"seed(s) repeated in {list(seeds)}")
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if epochs is None and not minutes > 0:
        raise ValueError(f"minutes must be > 0, got {minutes}")


def _score_candidate(
    candidate: Candidate,
    name: str,
    data: Path,
    seed: int,
    plans: Mapping[str, dict],
    common: Mapping,
    split: Dataset,
    k: int,
    out: Path,
    timings: dict,
) -> dict:
    """`score_localization` of the candidate's embeddings on `split` for one
    seed; records a trained run's training seconds in `timings` (a restored
    run keeps the time it took when it was trained)."""
    if candidate.settings is None:
        pixels = compute_pixel_pca(split, random_state=seed)["features"]
        return score_localization(split, {"pixels_pca": pixels}, k=k, random_state=seed)
    if candidate.trained:
        config = _config(candidate, data, seed, plans[name]["epochs"], common)
        folder = out / "runs" / name / f"seed{seed}"
        finished = (folder / "metrics.json").is_file()
        start = time.perf_counter()
        run = train_run(config, folder)
        seconds = time.perf_counter() - start
        key = f"{name}/seed{seed}"
        if not (finished and key in timings):
            timings[key] = seconds
        state = run.state
    else:
        config = _config(candidate, data, seed, 1, common)
        state = create_state(config, build_splits(config))
    features = named_features(get_frame_embeddings(state, split))
    return score_localization(split, features, k=k, random_state=seed)


def _collect(candidates, seeds, plans, results, timings) -> dict:
    """`compare.json`'s content, but its settings: the candidates' records and
    `compare_summary.summarise_scores` of their per-seed scores."""
    return {
        "candidates": {
            name: {
                "title": CANDIDATES[name].title,
                "settings": CANDIDATES[name].settings,
                "trained": CANDIDATES[name].trained,
                **(
                    {
                        "epochs": plans[name]["epochs"],
                        "seconds_per_epoch": plans[name].get("seconds_per_epoch"),
                        "training_seconds": [
                            timings.get(f"{name}/seed{seed}") for seed in seeds
                        ],
                    }
                    if name in plans
                    else {}
                ),
            }
            for name in candidates
        },
        **summarise_scores(results),
    }
