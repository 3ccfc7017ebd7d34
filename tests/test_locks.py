"""One writer per folder: a second writer fails at once, naming the first; a
refused run leaves nothing behind; two writers started together end with one
consistent result."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import _train_worker as train_worker
import numpy as np
import pytest
from conftest import latest_checkpoint_meta, write_tiny_release

from dlfb_localization import demo, runs
from dlfb_localization.cli import main
from dlfb_localization.dataset.cache import open_cache
from dlfb_localization.locks import LOCK_FILE, FolderLockedError, lock_folder
from dlfb_localization.nucleus.config import PredictConfig
from dlfb_localization.nucleus.run import run_prediction

# Bounds a hang of a started process, not a measure of speed.
TIMEOUT_S = 180
TINY_RUN = dict(embedding_dim=8, num_embeddings=16, batch_size=8, num_epochs=1)


def test_a_second_writer_fails_at_once_naming_the_holder(tmp_path):
    folder = tmp_path / "run"
    with lock_folder(folder):
        with pytest.raises(FolderLockedError) as refused, lock_folder(folder):
            pytest.fail("a second writer got the lock")
        assert (folder / LOCK_FILE).is_file()
    message = str(refused.value)
    assert "\n" not in message
    assert f"{folder} is being written by pid {os.getpid()} on " in message
    assert socket.gethostname() in message and "since" in message
    assert "pytest" in message  # the holder's command
    # Released: the lock file is gone and the folder can be locked again.
    assert sorted(os.listdir(folder)) == []
    with lock_folder(folder):
        pass


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from dlfb_localization.locks import lock_folder\n"
            "with lock_folder(sys.argv[1]):\n"
            "    print('locked', flush=True)\n"
            "    time.sleep(600)\n",
            str(folder),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(FolderLockedError, match=f"pid {holder.pid} on "):
            lock_folder(folder).__enter__()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=TIMEOUT_S)
    # The dead holder's lock file is still there, but no longer locked.
    assert (folder / LOCK_FILE).is_file()
    with lock_folder(folder):
        assert str(os.getpid()) in (folder / LOCK_FILE).read_text()
    assert not (folder / LOCK_FILE).exists()


def test_a_symlink_at_the_lock_files_name_is_not_followed(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_FILE).symlink_to(target)
    with pytest.raises(OSError):
        lock_folder(folder).__enter__()
    assert target.read_text() == "keep me"


# Every writer of a folder, started on a folder another process is writing:
# `write(folder, data)`.
WRITERS = {
    "train_run": lambda folder, data: runs.train_run(
        runs.RunConfig(data=str(data), **TINY_RUN), folder, progress=False
    ),
    "cache": lambda folder, data: open_cache(data, cache_dir=folder),
    "demo": lambda folder, data: demo.run(folder),
    "predict": lambda folder, data: run_prediction(
        PredictConfig(data=str(data), num_epochs=1), folder
    ),
    "fit": lambda folder, data: train_worker.run(folder),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_every_writer_refuses_a_folder_being_written(
    writer, module_tiny_release, tmp_path
):
    data, _, _ = module_tiny_release
    folder = tmp_path / "out"
    with lock_folder(folder):
        with pytest.raises(FolderLockedError, match=f"pid {os.getpid()} on "):
            WRITERS[writer](folder, data)
        assert os.listdir(folder) == [LOCK_FILE]


def test_the_command_line_names_the_holder_in_one_line(
    module_tiny_release, tmp_path, capsys
):
    data, _, _ = module_tiny_release
    store = tmp_path / "run"
    train = ["train", "--data", str(data), "--store", str(store), "--epochs", "1"]
    with lock_folder(store):
        assert main(train) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert f"is being written by pid {os.getpid()} on " in error


def test_a_refused_run_leaves_no_trace_and_the_corrected_one_trains(
    module_tiny_release, tmp_path
):
    data, _, _ = module_tiny_release
    store = tmp_path / "run"
    config = runs.RunConfig(data=str(data), **TINY_RUN)
    with pytest.raises(ValueError, match="num_epochs must be >= 1"):
        runs.train_run(dataclasses.replace(config, num_epochs=0), store)
    assert not store.exists()
    too_big = dataclasses.replace(config, batch_size=10_000)
    with pytest.raises(ValueError, match="batch_size must be in"):
        runs.train_run(too_big, store, progress=False)
    assert os.listdir(store) == []

    run = runs.train_run(config, store, progress=False)
    stored = json.loads((store / "config.json").read_text())
    assert runs.RunConfig.from_json(stored) == run.config == config
    assert [r["epoch"] for r in run.metrics["train"]["total_loss"]] == [0]
    _assert_one_consistent_run(store, config)


def test_settings_stored_before_a_first_epoch_failed_are_replaced(
    module_tiny_release, tmp_path
):
    # A run that stopped before its first checkpoint trained nothing: other
    # settings in the same folder are not refused.
    data, _, _ = module_tiny_release
    store = tmp_path / "run"
    store.mkdir()
    stopped = runs.RunConfig(data=str(data), **{**TINY_RUN, "learning_rate": 0.01})
    (store / "config.json").write_text(json.dumps(stopped.to_json()))
    config = runs.RunConfig(data=str(data), **TINY_RUN)
    runs.train_run(config, store, progress=False)
    _assert_one_consistent_run(store, config)


def _assert_one_consistent_run(store: Path, config: runs.RunConfig) -> None:
    """`store` holds `config`'s run: config.json and the latest checkpoint agree
    and load together."""
    loaded = runs.load_run(store)
    assert loaded.config == config
    meta = latest_checkpoint_meta(store / "checkpoints")
    assert meta["config"]["settings"] == config.settings()


# A writer in a fresh interpreter that takes part in every round: it waits for
# the round's start signal, runs `call` (its arguments formatted with the
# round) and records "done" or the FolderLockedError's message. Any other
# error ends it with a traceback.
_RACER = """
import os, sys, time
from pathlib import Path
{imports}
from dlfb_localization.locks import FolderLockedError
signals, name, rounds, *arguments = sys.argv[1:]
for round_ in range(int(rounds)):
    args = [a.format(round=round_) for a in arguments]
    Path(signals, f"ready-{{round_}}-{{name}}").touch()
    while not Path(signals, f"go-{{round_}}").exists():
        time.sleep(0.002)
    try:
        {call}
        outcome = "done"
    except FolderLockedError as error:
        outcome = str(error)
    recorded = Path(signals, f"{{name}}.tmp")
    recorded.write_text(outcome)
    os.replace(recorded, Path(signals, f"outcome-{{round_}}-{{name}}"))
"""
ROUNDS = 3


def _race(
    tmp_path: Path, imports: str, call: str, args: list[list[str]]
) -> list[list[tuple[int, str]]]:
    """Starts one racer per `args` and runs `ROUNDS` rounds, each started for
    all at once; returns each round's `(pid, outcome)` per racer."""
    code = _RACER.format(imports=imports, call=call)
    signals = tmp_path / "signals"
    signals.mkdir()
    # Each racer's stderr goes to a file: a pipe read only at the end would
    # block a racer that wrote more than its buffer (64 KiB) and hang the race.
    errors = [tmp_path / f"racer-{i}.err" for i in range(len(args))]
    racers = []
    for i, a in enumerate(args):
        with errors[i].open("w") as stderr:
            racers.append(
                subprocess.Popen(
                    [sys.executable, "-c", code, str(signals), str(i), str(ROUNDS), *a],
                    stderr=stderr,
                )
            )
    deadline = time.monotonic() + TIMEOUT_S

    def wait_for(prefix: str) -> list[Path]:
        paths = [signals / f"{prefix}-{i}" for i in range(len(racers))]
        while not all(p.exists() for p in paths):
            for path, racer, error in zip(paths, racers, errors, strict=True):
                if racer.poll() is not None and not path.exists():
                    pytest.fail(f"a racer failed: {error.read_text()}")
            assert time.monotonic() < deadline, "the racers hang"
            time.sleep(0.01)
        return paths

    try:
        rounds = []
        for round_ in range(ROUNDS):
            wait_for(f"ready-{round_}")
            (signals / f"go-{round_}").touch()
            outcomes = [p.read_text() for p in wait_for(f"outcome-{round_}")]
            rounds.append([(r.pid, o) for r, o in zip(racers, outcomes, strict=True)])
        for racer, error in zip(racers, errors, strict=True):
            assert racer.wait(timeout=TIMEOUT_S) == 0, error.read_text()
        return rounds
    finally:
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
                racer.wait()


@pytest.mark.slow
def test_two_trainings_with_other_settings_on_one_store(module_tiny_release, tmp_path):
    data, _, _ = module_tiny_release
    open_cache(data)  # built once here, so the racers only read it
    weights = ("1.0", "0.5")
    rounds = _race(
        tmp_path,
        "from dlfb_localization import runs",
        "runs.train_run(runs.RunConfig(data=args[0], classification_weight="
        f"float(args[2]), **{TINY_RUN!r}), args[1], progress=False)",
        [[str(data), str(tmp_path / "run{round}"), w] for w in weights],
    )
    for round_, outcomes in enumerate(rounds):
        done = [i for i, (_, outcome) in enumerate(outcomes) if outcome == "done"]
        assert len(done) == 1, outcomes
        winner_pid, loser = outcomes[done[0]][0], outcomes[1 - done[0]][1]
        assert f"is being written by pid {winner_pid} on " in loser
        config = runs.RunConfig(
            data=str(data), classification_weight=float(weights[done[0]]), **TINY_RUN
        )
        _assert_one_consistent_run(tmp_path / f"run{round_}", config)


def test_two_cache_builds_on_a_fresh_folder(tmp_path):
    # Large enough that building takes a while, so the two overlap.
    images = {}
    for round_ in range(ROUNDS):
        images[round_], _ = write_tiny_release(
            tmp_path / f"release{round_}", frames_per_fov=25, size=48
        )
    rounds = _race(
        tmp_path,
        "from dlfb_localization.dataset.cache import open_cache",
        "open_cache(args[0])",
        [[str(tmp_path / "release{round}")]] * 2,
    )
    for round_, outcomes in enumerate(rounds):
        # A builder arriving once the cache is finished reads it.
        assert "done" in [outcome for _, outcome in outcomes]
        for (_, outcome), (other_pid, _) in zip(outcomes, outcomes[::-1], strict=True):
            assert outcome == "done" or (
                f"dlfb_cache is being written by pid {other_pid} on " in outcome
            )
        cache = tmp_path / f"release{round_}" / "dlfb_cache"
        assert sorted(os.listdir(cache)) == [
            "images_c0.npy",
            "labels_c0.csv",
            "manifest_c0.json",
        ]
        frames, _, _ = open_cache(cache.parent)
        np.testing.assert_array_equal(frames, images[round_][..., :1])
