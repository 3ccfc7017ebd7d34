"""The main job on the embedded sample: what README's first command runs.

It follows the chapter end to end: write the sample, train the model with and
without the classification head, evaluate both beside an untrained model and a
raw-pixel baseline, write the chapter's figures and a short report.

The embedded sample is not stored as arrays: it is generator parameters, and
`write_release` turns them into the OpenCell release format in seconds. Models
are evaluated on a second generated set of proteins never seen in training
(`EVALUATION_SAMPLE`): the demo's training set has 40 proteins, too few held-out
ones for a protein-level k-NN to mean much.

Run again with the same folder, the finished runs are restored from their
checkpoints instead of trained again.
"""

import functools
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dlfb_localization.dataset import Dataset
from dlfb_localization.dataset.builder import DatasetBuilder
from dlfb_localization.dataset.synthetic import SyntheticSpec, write_release
from dlfb_localization.demo_report import report_markdown
from dlfb_localization.demo_reuse import (
    evaluation_path,
    inputs_of,
    inputs_path,
    reuse,
    reused_figures,
)
from dlfb_localization.embeddings import get_frame_embeddings
from dlfb_localization.evaluate import evaluate
from dlfb_localization.figures import save_figure, write_model_figures
from dlfb_localization.files import write_json, write_text
from dlfb_localization.locks import lock_folder
from dlfb_localization.model.interface import ModelState
from dlfb_localization.projection import compile_umap
from dlfb_localization.run_record import to_json
from dlfb_localization.runs import (
    METRICS_FILE,
    Run,
    RunConfig,
    build_splits,
    create_state,
    train_run,
)

EMBEDDED_SAMPLE = SyntheticSpec(
    n_proteins=40, fovs_per_protein=4, crops_per_fov=10, n_blocks=2, seed=0
)
# Many proteins with few frames each: protein-level k-NN accuracy over 150
# proteins varies far less from one draw to the next than over 60.
EVALUATION_SAMPLE = SyntheticSpec(
    n_proteins=150, fovs_per_protein=1, crops_per_fov=8, n_blocks=1, seed=1
)
# The chapter's model and optimizer, narrower (D=32) and with smaller batches so
# that both models train in about two minutes each on a 2-core CPU.
DEMO_TRAINING = {
    "embedding_dim": 32,
    "num_embeddings": 512,
    "batch_size": 32,
    "num_epochs": 8,
    "learning_rate": 1e-3,
}
# The head's loss weighs 0.1, not the chapter's 1. With 40 training proteins the
# head (20M weights) memorises the training frames: at weight 1 its training
# accuracy reaches 0.94 while the validation frames' stays at 0.24 and their
# cross-entropy climbs from 3.1 to 8.6; its loss, ~10x the reconstruction error,
# then shapes the codebook around those 40 identities, and the mean quantized
# vectors of unseen proteins place them no better than an untrained model's
# (protein-level 5-NN 0.65-0.70 against 0.70 over six trainings). At 0.1 the head
# still spreads code use (perplexity ~1.8x the head-less model's).
MODELS = {
    "with_head": ("With ClassificationHead", 0.1),
    "without_head": ("No ClassificationHead", 0.0),
}
UNTRAINED = ("untrained", "Untrained model")
# The interactive map (`figures/map.html`) shows the model whose histograms
# place unseen proteins best at this scale (README, "What the demo shows").
MAP_MODEL = "without_head"
EMBEDDINGS = ("codebook_histogram", "mean_quantized", "pixels_pca")


def run(out_dir: str | Path, seed: int = 42) -> Path:
    """Runs the main job into `out_dir` and returns the path of its report.

    Writes `data/` (the sample), `evaluation_data/` (unseen proteins),
    `runs/<model>/` (config, checkpoints, metrics), `evaluation/<model>.json`,
    `figures/*.png`, `figures/map.html` (interactive, of `MAP_MODEL`) and
    `report.md`, holding the folder's lock
    (`locks.lock_folder`) throughout.

    Run again, it does only what changed: the samples are kept if the same
    specs wrote them (`samples.json`), finished models are restored, and an
    evaluation or the figures are reused when the parameters' bytes, the
    evaluation data's fingerprint and the library's version they were computed
    from (`<file>.inputs.json`) are the same.

    Raises:
      locks.FolderLockedError: another process is writing `out_dir`.
    """
    out = Path(out_dir)
    print(_plan(out))
    with lock_folder(out):
        return _run(out, seed)


def _run(out: Path, seed: int) -> Path:
    # UMAP's numba code compiles while the samples are written (on one core)
    # and the models train (`_compile_umap`). Finished models are only
    # restored: nothing to compile beside.
    compiling = None
    if not all((out / "runs" / name / METRICS_FILE).is_file() for name in MODELS):
        compiling = _compile_umap()
    clock = _Clock(total=4)
    clock.stage(
        "data",
        f"writing the embedded sample and {EVALUATION_SAMPLE.n_proteins} unseen "
        "proteins for evaluation",
    )
    _write_samples(out)

    configs = {
        name: RunConfig(
            data=str(out / "data"),
            seed=seed,
            classification_weight=weight,
            **DEMO_TRAINING,
        )
        for name, (_, weight) in MODELS.items()
    }
    clock.stage(
        "training", f"training (or restoring) {len(MODELS)} models at the same time"
    )
    for name, (title, _) in MODELS.items():
        print(f"  {name}: {title}")
    first = next(iter(configs))
    # Built here, so that the runs only read the cache; the untrained model
    # is created on these splits.
    splits = build_splits(configs[first], progress=True)
    # One thread per training (at the demo's batch of 32, XLA keeps 1.6 of 2
    # cores busy with one training, two at once keep 1.9 busy), and one for
    # each task after them. The untrained model's evaluation needs no
    # training: queued behind them, it starts on the first core that a
    # finished training frees. Each run's arithmetic is the same as alone.
    workers = max(len(MODELS), min(len(MODELS) + 2, os.cpu_count() or 2))
    failed = threading.Event()
    with ThreadPoolExecutor(workers, thread_name_prefix="demo") as pool:
        trainings = {
            name: pool.submit(_train, config, out / "runs" / name, failed)
            for name, config in configs.items()
        }
        evaluation_split = DatasetBuilder(out / "evaluation_data").build(
            rng=seed, splits={"evaluation": 1.0}
        )["evaluation"]
        untrained = pool.submit(
            _evaluate_untrained,
            out,
            configs[first],
            splits,
            evaluation_split,
            compiling,
            failed,
        )
        runs = _results(trainings)

        clock.stage(
            "evaluation and figures",
            "evaluating on unseen proteins (k-NN, probe, cluster scores) and, at "
            "the same time, drawing the figures",
        )
        if compiling is not None:
            # Long done, as a rule; this process loads the compiled code while
            # the embeddings below are computed.
            compiling.wait()
            threading.Thread(target=compile_umap, name="load-umap", daemon=True).start()
        states = {name: run.state for name, run in runs.items()}
        inputs = {
            name: inputs_of(state, evaluation_split) for name, state in states.items()
        }
        results = {
            name: reuse(evaluation_path(out, name), inputs[name]) for name in states
        }
        _print_reused(out, results)
        # What both evaluation and figures read, computed once, before they
        # start.
        embeddings = {
            name: get_frame_embeddings(state, evaluation_split)
            for name, state in states.items()
            if results[name] is None
        }
        # The figures first: a thread that is done takes the next evaluation.
        tasks = {
            "figures": functools.partial(
                _figures, out, runs, evaluation_split, embeddings, inputs
            ),
            **{
                name: functools.partial(
                    _evaluate_model,
                    out,
                    name,
                    states[name],
                    evaluation_split,
                    embeddings[name],
                    inputs[name],
                )
                for name in embeddings
            },
        }
        futures = {name: pool.submit(task) for name, task in tasks.items()}
        done = _results({UNTRAINED[0]: untrained, **futures})
        written = done.pop("figures")
        results = {UNTRAINED[0]: done.pop(UNTRAINED[0])} | {
            name: results[name] or done[name] for name in runs
        }

    clock.stage("report", "writing the report")
    report = out / "report.md"
    write_json(results, out / "report.json")
    text = report_markdown(
        configs,
        runs,
        results,
        written,
        out,
        clock.seconds,
        models=MODELS,
        untrained=UNTRAINED,
        sample=EMBEDDED_SAMPLE,
        embeddings=EMBEDDINGS,
        map_model=MAP_MODEL,
    )
    write_text(text, report)
    clock.stop()
    print(f"run folder: {out.resolve()}\nreport: {report.resolve()}")
    return report


def _compile_umap() -> subprocess.Popen:
    """Starts `projection.compile_umap` in a process of its own and returns it.

    From a cold cache it takes 45-55 s of a core. The child compiles into
    numba's cache on disk (`projection.umap_module`), from which this process
    then loads the code in about 5 s. In a thread of this process, compiling
    held Python's lock most of the time, which the training threads need
    between steps: from a cold cache the demo's training took 248 s beside
    it, 217 s beside the child. (At the lowest priority the child got almost
    no time until the training ended, and the evaluation stage waited for
    it: 215 s of training, but 103 s of evaluation instead of 68 s.) Where it
    fails, this process compiles the code itself when it first needs it.
    """
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from dlfb_localization.projection import compile_umap; compile_umap()",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _results(futures: dict[str, Future]) -> dict[str, Any]:
    """`{name: future.result()}`, waiting for each in turn.

    A thread cannot be interrupted, so Ctrl-C ends the process at once, as a
    kill would: every finished epoch is checkpointed (an unfinished save is
    never taken for one), every file is written through a temporary name, and
    running the demo again resumes.
    """
    try:
        return {name: future.result() for name, future in futures.items()}
    except KeyboardInterrupt:
        print("\nstopped: run the demo again to resume", flush=True)
        os._exit(130)


def _print_reused(out: Path, results: dict[str, dict | None]) -> None:
    for name, result in results.items():
        if result is not None:
            print(
                f"  {name}: reused {evaluation_path(out, name)} (same model and data)"
            )


def _train(config: RunConfig, folder: Path, failed: threading.Event) -> Run:
    """`train_run(config, folder)`; sets `failed` before a failure leaves it
    (so the queued untrained evaluation, which its thread would take next,
    sees it)."""
    try:
        return train_run(config, folder)
    except BaseException:
        failed.set()
        raise


def _evaluate_untrained(
    out: Path,
    config: RunConfig,
    splits: dict[str, Dataset],
    evaluation_split: Dataset,
    compiling: subprocess.Popen | None,
    failed: threading.Event,
) -> dict | None:
    """The untrained model's evaluation (the initial state of `config`'s run
    on `splits`), or the stored one if it was computed from the same
    parameters and data; None, without computing anything, once a training
    has `failed`: the demo then stops with that training's error, and should
    not wait for this."""
    if failed.is_set():
        return None
    name = UNTRAINED[0]
    state = create_state(config, splits)
    inputs = inputs_of(state, evaluation_split)
    result = reuse(evaluation_path(out, name), inputs)
    if result is not None:
        _print_reused(out, {name: result})
        return result
    if compiling is not None:
        compiling.wait()  # UMAP's code, compiled into numba's cache
    embeddings = get_frame_embeddings(state, evaluation_split)
    return _evaluate_model(out, name, state, evaluation_split, embeddings, inputs)


def _evaluate_model(
    out: Path,
    name: str,
    state: ModelState,
    evaluation_split: Dataset,
    embeddings: dict,
    inputs: dict,
) -> dict:
    """`evaluate` of `state`, written to `out/evaluation/<name>.json` with
    what it was computed from beside it (`<name>.json.inputs.json`)."""
    print(f"  evaluating {name}")
    path = evaluation_path(out, name)
    result = evaluate(
        state,
        evaluation_split,
        out_path=path,
        progress=True,
        frame_embeddings=embeddings,
    )
    write_json(inputs, inputs_path(path))
    return result


def _figures(
    out: Path,
    runs: dict[str, Run],
    evaluation_split: Dataset,
    embeddings: dict[str, dict],
    drawn: dict[str, dict],
) -> dict[str, Path]:
    """Draws the figures into `out/figures`, or reuses those drawn from models
    and data with these inputs (`drawn`); returns their paths by name. Only
    this thread draws: matplotlib's pyplot is not thread-safe."""
    figures = out / "figures"
    written = reused_figures(out, drawn)
    if written is not None:
        print(f"  reused {figures} (same models and data)")
        return written
    figures.mkdir(parents=True, exist_ok=True)
    first = next(iter(runs.values()))
    written = {
        "random_frames": save_figure(
            first.splits["train"].plot_random_frames(n=16, rng=first.rng_frames),
            figures / "random_frames.png",
        )
    }
    written |= write_model_figures(
        {name: (run.state, run.metrics) for name, run in runs.items()},
        evaluation_split,
        figures,
        rng=first.rng_frames,
        titles={name: title for name, (title, _) in MODELS.items()},
        frame_embeddings=embeddings,
        map_model=MAP_MODEL,
    )
    listing = {key: str(path.relative_to(out)) for key, path in written.items()}
    write_json({"inputs": drawn, "figures": listing}, inputs_path(figures))
    return written


def _write_samples(out: Path) -> None:
    """Writes the sample and the unseen proteins, unless `out` holds both as
    these specs wrote them (`samples.json`, written after them, says so):
    rewriting them would also make the cache be built again."""
    record = out / "samples.json"
    wanted = to_json({"data": EMBEDDED_SAMPLE, "evaluation_data": EVALUATION_SAMPLE})
    written = all((out / name).is_dir() for name in wanted)
    if written and record.is_file() and json.loads(record.read_text()) == wanted:
        print(f"  reused {out / 'data'} and {out / 'evaluation_data'}")
        return
    record.unlink(missing_ok=True)
    write_release(out / "data", EMBEDDED_SAMPLE, progress=True)
    write_release(out / "evaluation_data", EVALUATION_SAMPLE, progress=True)
    write_json(wanted, record)


class _Clock:
    """Prints each stage as `[i/n] what` when it starts and its time when it
    ends; `seconds` holds the finished stages' times."""

    def __init__(self, total: int):
        self.total = total
        self.seconds: dict[str, float] = {}
        self._current: tuple[str, float] | None = None

    def stage(self, name: str, text: str) -> None:
        self.stop()
        print(f"[{len(self.seconds) + 1}/{self.total}] {text}", flush=True)
        self._current = (name, time.perf_counter())

    def stop(self) -> None:
        if self._current is not None:
            name, start = self._current
            self.seconds[name] = time.perf_counter() - start
            print(f"      {name} took {self.seconds[name]:.0f} s", flush=True)
            self._current = None


def _plan(out: Path) -> str:
    """What the demo is about to do, where, and for how long."""
    return (
        f"demo: writes an OpenCell-like sample of {EMBEDDED_SAMPLE.n_proteins} "
        f"proteins, trains the chapter's model with and without its "
        f"classification head ({DEMO_TRAINING['num_epochs']} epochs each), "
        f"evaluates both on {EVALUATION_SAMPLE.n_proteins} unseen proteins and "
        f"writes figures and a report into {out.resolve()}.\n"
        "It takes 3.5 to 8 minutes on 2 CPU cores (less with a GPU). Stop it "
        "with Ctrl-C: run again, it resumes, and finished models are restored."
    )
