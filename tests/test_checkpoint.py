"""Checkpointed training: restore, resume after a kill, refuse the wrong run."""

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _train_worker as worker
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny
from conftest import assert_same_tree
from orbax.checkpoint._src.path import atomicity

from dlfb_localization import checkpoint
from dlfb_localization import train as train_module
from dlfb_localization.checkpoint import ConfigMismatchError
from dlfb_localization.model import LocalizationModel
from dlfb_localization.train import NonFiniteLossError

WORKER = Path(__file__).with_name("_train_worker.py")
REPO = Path(__file__).resolve().parent.parent
STEPS_PER_EPOCH = worker.TRAIN_FRAMES // worker.BATCH_SIZE
FINAL_STEP = worker.NUM_EPOCHS * STEPS_PER_EPOCH


def _finalized_steps(path: Path) -> list[int]:
    if not path.exists():
        return []
    return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit())


def _assert_same_run(state, metrics, reference_state, reference_metrics) -> None:
    assert int(state.step) == int(reference_state.step) == FINAL_STEP
    assert_same_tree(state.params, reference_state.params)  # bitwise
    assert_same_tree(state.opt_state, reference_state.opt_state)
    assert metrics == reference_metrics


def _forbid_training(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("a step ran, but the run should have been restored")

    monkeypatch.setattr(train_module, "train_step", fail)
    monkeypatch.setattr(train_module, "eval_step", fail)


def _snapshot(path: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def reference(reference_run):
    """The uninterrupted run (conftest.py): (store_path, state, metrics)."""
    return reference_run


def test_finished_run_is_restored_without_training(reference, monkeypatch):
    store_path, reference_state, reference_metrics = reference
    _forbid_training(monkeypatch)

    state, metrics = worker.run(store_path)

    _assert_same_run(state, metrics, reference_state, reference_metrics)
    assert [r["epoch"] for r in metrics["valid"]["recon_loss"]] == [0, 2, 4, 5]


def test_checkpoint_restores_into_a_differently_seeded_state(reference):
    store_path, reference_state, reference_metrics = reference
    manager = checkpoint.open_manager(store_path)
    try:
        step = manager.latest_step()
        state = checkpoint.restore_state(manager, step, worker.make_state(seed=7))
        meta = checkpoint.read_meta(manager, step)
    finally:
        manager.close()

    assert step == FINAL_STEP
    assert_same_tree(state.params, reference_state.params)
    assert_same_tree(state.opt_state, reference_state.opt_state)
    images = worker.make_splits()["valid"].images.frames[:4]
    forward = jax.jit(
        lambda p: worker.MODEL.apply(
            {"params": p}, images, False, method=LocalizationModel.compute_outputs
        )
    )
    outputs = [forward(s.params) for s in (state, reference_state)]
    assert_same_tree(*outputs)
    # The metadata is plain JSON on disk, holding the config and the metrics.
    on_disk = json.loads((store_path / str(step) / "meta" / "metadata").read_text())
    assert on_disk == meta
    assert meta["epoch"] == worker.NUM_EPOCHS - 1
    assert meta["metrics"] == reference_metrics
    assert meta["config"]["model"]["dropout_rate"] == worker.MODEL.dropout_rate
    assert meta["config"]["batch_size"] == worker.BATCH_SIZE
    assert meta["config"]["input_shape"] == [16, 16, 1]


def test_run_resumes_after_a_kill_and_ends_identical(reference, tmp_path, caplog):
    store_path = tmp_path / "killed"
    env = {
        **os.environ,  # with the session's XLA flags and caches (conftest.py)
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "JAX_PLATFORMS": "cpu",
    }
    command = [sys.executable, str(WORKER), str(store_path)]
    slow = subprocess.Popen(
        [*command, "--seconds-per-batch", "0.3"],
        env=env,
        # Not a pipe: nobody reads it while the process runs, and a full pipe
        # would block it.
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not _finalized_steps(store_path) and slow.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        slow.send_signal(signal.SIGKILL)
        slow.wait(timeout=30)
    finally:
        if slow.poll() is None:
            slow.kill()
    assert slow.returncode == -signal.SIGKILL
    assert 0 < _finalized_steps(store_path)[-1] < FINAL_STEP

    # Started again (in this process: nothing of the killed one is left but its
    # files), the run resumes from its last finalized step.
    with caplog.at_level(logging.INFO, logger="dlfb_localization"):
        finished_state, finished_metrics = worker.run(store_path)

    assert any("resuming" in record.getMessage() for record in caplog.records)
    _, reference_state, reference_metrics = reference
    _assert_same_run(
        finished_state, finished_metrics, reference_state, reference_metrics
    )
    with pytest.MonkeyPatch.context() as patch:
        _forbid_training(patch)
        state, metrics = worker.run(store_path)
    _assert_same_run(state, metrics, reference_state, reference_metrics)


def test_a_crash_before_a_save_is_finalized_leaves_the_previous_one(
    reference, tmp_path, monkeypatch
):
    store_path = tmp_path / "crashed"
    crash_step = 3 * STEPS_PER_EPOCH  # the save after epoch 2
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def crash_at_rename(self, *args, **kwargs):
        # All data are written into `<step>.orbax-checkpoint-tmp`; the rename into
        # `<step>` is what makes a step visible. Fail just before it.
        if self.get_final() == store_path / str(crash_step):
            raise OSError("simulated crash before the rename")
        return await finalize(self, *args, **kwargs)

    monkeypatch.setattr(
        atomicity.AtomicRenameTemporaryPath, "finalize", crash_at_rename
    )
    with pytest.raises(OSError, match="simulated crash"):
        worker.run(store_path)
    monkeypatch.undo()
    # Epochs 0 and 1 are finalized; epoch 2's save stayed a temporary folder.
    assert sorted(p.name for p in store_path.iterdir()) == [
        str(crash_step - 2 * STEPS_PER_EPOCH),
        str(crash_step - STEPS_PER_EPOCH),
        f"{crash_step}.orbax-checkpoint-tmp",
    ]

    state, metrics = worker.run(store_path)

    _, reference_state, reference_metrics = reference
    _assert_same_run(state, metrics, reference_state, reference_metrics)
    assert not any("tmp" in p.name for p in store_path.iterdir())


def test_a_different_configuration_is_refused_by_name(reference):
    store_path, _, _ = reference
    before = _snapshot(store_path)

    with pytest.raises(ConfigMismatchError, match="batch_size: stored 8, now 4"):
        worker.run(store_path, batch_size=4)
    with pytest.raises(ConfigMismatchError, match="init_params"):
        worker.run(store_path, state=worker.make_state(seed=3))
    with pytest.raises(ConfigMismatchError, match=r"optimizer\.probe_update"):
        worker.run(store_path, state=worker.make_state(tx=optax.adam(1e-2)))
    mixed = worker.MODEL.clone(dtype=jnp.bfloat16).create_train_state(
        jax.random.key(0), np.zeros((1, 16, 16, 1), np.float32), worker.TX
    )
    with pytest.raises(ConfigMismatchError, match="dtype: stored 'float32', now"):
        worker.run(store_path, state=mixed)
    splits = worker.make_splits()
    splits["valid"] = splits["train"]
    with pytest.raises(ConfigMismatchError, match=r"data\.valid"):
        worker.run(store_path, splits=splits)

    assert _snapshot(store_path) == before


def test_rounding_differences_from_another_backend_are_tolerated():
    state = worker.make_state()
    splits = worker.make_splits()
    arguments = dict(
        num_epochs=2, batch_size=8, classification_weight=1.0, eval_every=1
    )
    stored = checkpoint.build_run_config(state, jax.random.key(1), splits, **arguments)
    # Every weight one float32 ulp away, as a GPU's init might be.
    nudged = state.replace(
        params=jax.tree.map(lambda x: np.nextafter(x, np.inf), state.params)
    )
    other_seed = worker.make_state(seed=1)

    nudged_config = checkpoint.build_run_config(
        nudged, jax.random.key(1), splits, **arguments
    )
    other_config = checkpoint.build_run_config(
        other_seed, jax.random.key(1), splits, **arguments
    )

    assert nudged_config["init_params"]["sha256"] != stored["init_params"]["sha256"]
    assert checkpoint.find_config_differences(stored, nudged_config) == []
    differences = checkpoint.find_config_differences(stored, other_config)
    assert [d.split(":")[0] for d in differences] == ["init_params"]


class _NanBatches(worker.SlowBatches):
    """Makes one batch's images NaN: batch `batch` of the `call`-th epoch."""

    def __init__(self, dataset, call: int, batch: int):
        super().__init__(dataset, seconds_per_batch=0.0)
        self._calls, self._bad_call, self._bad_batch = 0, call, batch

    def get_batches(self, *args, **kwargs):
        call, self._calls = self._calls, self._calls + 1
        for i, batch in enumerate(super().get_batches(*args, **kwargs)):
            if (call, i) == (self._bad_call, self._bad_batch):
                batch = {**batch, "images": np.full_like(batch["images"], np.nan)}
            yield batch


def test_a_non_finite_loss_stops_training_and_keeps_the_last_checkpoint(tmp_path):
    store_path = tmp_path / "diverged"
    splits = worker.make_splits()
    clean_train = splits["train"]
    # NaN in the second batch of epoch 1: step 3 + 1.
    splits["train"] = _NanBatches(clean_train, call=1, batch=1)

    with pytest.raises(NonFiniteLossError, match=r"epoch 1: first at step 4 .*3-5"):
        worker.run(store_path, splits=splits)

    assert _finalized_steps(store_path) == [STEPS_PER_EPOCH]
    assert sorted(p.name for p in store_path.iterdir()) == [str(STEPS_PER_EPOCH)]
    before = _snapshot(store_path)
    # Resuming replays epoch 1 (now the first call) and fails the same way.
    splits["train"] = _NanBatches(clean_train, call=0, batch=1)
    with pytest.raises(NonFiniteLossError, match="epoch 1"):
        worker.run(store_path, splits=splits)
    assert _snapshot(store_path) == before
    manager = checkpoint.open_manager(store_path)
    try:
        kept = checkpoint.restore_state(manager, STEPS_PER_EPOCH, worker.make_state())
    finally:
        manager.close()
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(kept.params))


def test_a_run_written_before_the_lookup_setting_is_the_euclidean_one():
    current = {"model": {"codebook": {"ema_decay": None, "lookup": "euclidean"}}}
    written_before = {"model": {"codebook": {"ema_decay": None}}}
    assert checkpoint.find_config_differences(written_before, current) == []
    current["model"]["codebook"]["lookup"] = "cosine"
    assert checkpoint.find_config_differences(written_before, current) == [
        "model.codebook.lookup: stored 'euclidean', now 'cosine'"
    ]
    # Any other field missing from the stored run is still a difference.
    current["model"]["codebook"]["new_setting"] = 1
    assert "model.codebook.new_setting: only in the run" in (
        checkpoint.find_config_differences(written_before, current)
    )


def test_runs_written_before_settings_were_recorded_are_still_recognised():
    # A run whose checkpoint predates the "settings" record is compared field
    # by field as before; once recorded, a changed setting is named.
    current = {"batch_size": 8, "settings": {"seed": 1}}
    assert checkpoint.find_config_differences({"batch_size": 8}, current) == []
    assert checkpoint.find_config_differences({"batch_size": 4}, current) == [
        "batch_size: stored 4, now 8"
    ]
    assert checkpoint.find_config_differences(
        {"batch_size": 8, "settings": {"seed": 2}}, current
    ) == ["settings.seed: stored 2, now 1"]


def test_a_run_folder_written_before_the_lookup_setting_reads_as_euclidean():
    from dlfb_localization.runs import RunConfig

    written_before = RunConfig(data="data").to_json()
    del written_before["lookup"]
    assert RunConfig.from_json(written_before).lookup == "euclidean"
    assert RunConfig(data="data").lookup == "cosine"
    assert RunConfig.from_json(RunConfig(data="data").to_json()).lookup == "cosine"


def test_a_checkpoint_of_a_plain_train_state_restores_into_a_model_state(tmp_path):
    # Checkpoints written before `ModelState` hold a plain `TrainState`'s arrays
    # (step, params, opt_state): they restore, value for value; a state of
    # another layout is refused with a message naming the folder.
    model = LocalizationModel(**tiny.CHAPTER)
    state = model.create_train_state(
        jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)), optax.adam(1e-3)
    )
    old = train_module.TrainState(
        step=state.step + 3,
        apply_fn=state.apply_fn,
        params=jax.tree.map(lambda x: x + 1, state.params),
        tx=state.tx,
        opt_state=state.opt_state,
    )
    manager = checkpoint.open_manager(tmp_path / "old")
    try:
        checkpoint.save_epoch(manager, old, 0, {"num_epochs": 1}, {})
        restored = checkpoint.restore_state(manager, 3, state)
        with pytest.raises(ConfigMismatchError, match="shaped differently"):
            checkpoint.restore_state(
                manager, 3, state.replace(collections={"extra": jnp.zeros(2)})
            )
    finally:
        manager.close()
    assert type(restored) is type(state) and restored.model == model
    assert int(restored.step) == 3
    assert_same_tree(restored.params, old.params)


def test_runs_saving_in_threads_at_the_same_time_keep_every_step(tmp_path):
    # `demo` trains its models in threads: Orbax signals between its own
    # threads by a per-process operation number, and two saves at once used to
    # read each other's signals and time out. Each run's steps are all there,
    # with its own arrays and metadata.
    model = LocalizationModel(**tiny.CHAPTER)
    state = model.create_train_state(
        jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)), optax.adam(1e-3)
    )
    start = threading.Barrier(2)

    def save_steps(name: str, offset: float) -> None:
        manager = checkpoint.open_manager(tmp_path / name)
        try:
            start.wait()
            for epoch in range(3):
                saved = state.replace(
                    step=epoch + 1,
                    params=jax.tree.map(
                        lambda x, v=offset + epoch: x + v, state.params
                    ),
                )
                checkpoint.save_epoch(manager, saved, epoch, {"run": name}, {})
        finally:
            manager.close()

    with ThreadPoolExecutor(2) as pool:
        for future in [
            pool.submit(save_steps, "a", 0.0),
            pool.submit(save_steps, "b", 10.0),
        ]:
            future.result(timeout=120)
    for name, offset in (("a", 0.0), ("b", 10.0)):
        manager = checkpoint.open_manager(tmp_path / name)
        try:
            assert manager.all_steps() == [2, 3]  # MAX_TO_KEEP
            assert checkpoint.read_meta(manager, 3)["config"] == {"run": name}
            restored = checkpoint.restore_state(manager, 3, state)
        finally:
            manager.close()
        expected = jax.tree.map(lambda x, v=offset + 2: x + v, state.params)
        assert_same_tree(restored.params, expected)


def _truncate_largest_array_file(step: Path) -> None:
    largest = max((step / "state").rglob("*"), key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[:100])


def test_a_damaged_latest_step_is_set_aside_and_the_run_resumes_before_it(
    reference, tmp_path, caplog
):
    store_path, reference_state, reference_metrics = reference
    shutil.copytree(store_path, tmp_path / "store")
    store = tmp_path / "store"
    older, newest = _finalized_steps(store)
    _truncate_largest_array_file(store / str(newest))

    with caplog.at_level(logging.WARNING, logger="dlfb_localization.checkpoint"):
        state, metrics = worker.run(store)  # retrains the damaged step's epoch

    _assert_same_run(state, metrics, reference_state, reference_metrics)
    assert f"{store}: step {newest} is damaged, its arrays" in caplog.text
    assert f"using step {older}" in caplog.text
    assert _finalized_steps(store) == [older, newest]
    assert (store / f"{newest}.damaged").is_dir()  # kept, not deleted


def test_a_store_whose_every_step_is_damaged_is_refused_naming_it(reference, tmp_path):
    store_path, _, _ = reference
    shutil.copytree(store_path, tmp_path / "store")
    store = tmp_path / "store"
    for step in _finalized_steps(store):
        meta = store / str(step) / "meta" / "metadata"
        meta.write_text(meta.read_text()[:21])
    before = _snapshot(store)
    with pytest.raises(checkpoint.DamagedCheckpointError, match=f"{store}: no"):
        worker.run(store)
    assert _snapshot(store) == before


def test_a_full_disk_names_the_folder_and_keeps_the_previous_step(
    tmp_path, monkeypatch
):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    state = worker.make_state()
    manager = checkpoint.open_manager(tmp_path / "run")
    try:
        checkpoint.save_epoch(manager, state, 0, {"num_epochs": 2}, {})

        async def disk_full(self, item, directory):
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))

        handler = json_checkpoint_handler.JsonCheckpointHandler
        monkeypatch.setattr(handler, "_save_fn", disk_full)
        later = state.replace(step=state.step + 1)
        with pytest.raises(OSError, match=f"epoch 2 into {tmp_path / 'run'} "):
            checkpoint.save_epoch(manager, later, 1, {"num_epochs": 2}, {})
    finally:
        manager.close()
    assert _finalized_steps(tmp_path / "run") == [0]
