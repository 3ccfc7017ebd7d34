"""Data parallelism: two (forced host) devices train like one, and two JAX
processes of one device each train like one process with two devices."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import _train_worker as worker
import jax
import numpy as np
import pytest
from conftest import built_once

WORKER = Path(__file__).with_name("_train_worker.py")


def _worker_env(n_devices: int) -> dict[str, str]:
    env = dict(os.environ)
    devices = f"--xla_force_host_platform_device_count={n_devices}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _read_report(out: str, folder: Path) -> dict:
    line = next(line for line in out.splitlines() if line.startswith("REPORT "))
    report = json.loads(line.removeprefix("REPORT "))
    with np.load(folder / "outputs.npz") as outputs:
        report.update(outputs)
    with np.load(folder / "params.npz") as params:
        report["params"] = dict(params)
    return report


def _run_worker(folder: Path, n_devices: int) -> str:
    """The seeded worker run in a process with `n_devices` (forced host)
    devices, into `folder`; returns its standard output."""
    return subprocess.run(
        [sys.executable, str(WORKER), str(folder), "--report"],
        env=_worker_env(n_devices),
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout


def _report(tmp_path, n_devices):
    folder = tmp_path / f"run{n_devices}"
    return _read_report(_run_worker(folder, n_devices), folder)


def _one_device_report(reference_run, tmp_path):
    """The one-device side. When this process is one CPU device, that is the
    session's reference run (the same seeded worker run, trained here); else a
    worker process with one forced host device, like the two-device side."""
    if jax.default_backend() != "cpu" or jax.device_count() != 1:
        return _report(tmp_path, 1)
    _, state, metrics = reference_run
    outputs = worker.predict_valid(state, worker.make_splits())
    return {"devices": jax.device_count(), "metrics": metrics, **outputs}


@pytest.fixture(scope="module")
def two_device_report():
    """The seeded worker run in one process with two (forced host) devices,
    run once in the session (`conftest.built_once`) and read by every worker."""
    with built_once("two_devices") as (folder, build):
        if build:
            (folder / "stdout.txt").write_text(_run_worker(folder / "run", 2))
    return _read_report((folder / "stdout.txt").read_text(), folder / "run")


def test_two_devices_give_the_metrics_of_one(
    reference_run, two_device_report, tmp_path
):
    one, two = _one_device_report(reference_run, tmp_path), two_device_report
    assert (one["devices"], two["devices"]) == (1, 2)
    for split in ("train", "valid"):
        for name, records in one["metrics"][split].items():
            means = [r["mean"] for r in records]
            other = [r["mean"] for r in two["metrics"][split][name]]
            np.testing.assert_allclose(other, means, rtol=1e-4, atol=1e-5, err_msg=name)
    # The trained models compute the same function up to float rounding. (Their
    # parameters are not compared: a conv bias feeding a one-channel GroupNorm
    # group has zero gradient up to rounding noise, which Adam turns into full
    # steps, yet GroupNorm removes that bias from every output.)
    for name in ("decoded", "logits"):
        np.testing.assert_allclose(two[name], one[name], rtol=1e-3, atol=1e-4)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def test_two_processes_train_exactly_like_one_process_with_two_devices(
    two_device_report, tmp_path
):
    """`train` in two JAX processes (`jax.distributed.initialize`, a local
    coordinator, one CPU device each, Gloo collectives): the path a pod slice
    or several GPU hosts take. Each process feeds the same global batches and
    keeps its share; both end with the parameters, metrics and outputs of one
    process driving two devices, which runs the same SPMD program. (Equal up to
    float tolerance is what is promised; on this machine they agree to the
    bit.)"""
    coordinator = f"localhost:{_free_port()}"
    store = tmp_path / "run"
    # Each process writes into files, not pipes: with pipes, read one process
    # after the other, the second blocks once it has written a pipe's buffer
    # (64 KiB, e.g. of JAX's compile log), and the first waits for it in a
    # collective until the timeout.
    logs = [(tmp_path / f"out_{i}.txt", tmp_path / f"err_{i}.txt") for i in range(2)]
    processes = []
    for i, (out, err) in enumerate(logs):
        with out.open("w") as stdout, err.open("w") as stderr:
            processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(WORKER),
                        str(store),
                        "--report",
                        *("--process", str(i), "--processes", "2"),
                        *("--coordinator", coordinator),
                    ],
                    env=_worker_env(1),
                    stdout=stdout,
                    stderr=stderr,
                )
            )
    reports = []
    try:
        for i, (process, (out, err)) in enumerate(zip(processes, logs, strict=True)):
            process.wait(timeout=300)
            assert process.returncode == 0, err.read_text()[-3000:]
            reports.append(_read_report(out.read_text(), store / f"process_{i}"))
    finally:
        for process in processes:
            process.kill()
    two = two_device_report
    for report in reports:
        assert (report["processes"], report["devices"]) == (2, 2)
        assert report["params"].keys() == two["params"].keys()
        for name, value in report["params"].items():
            np.testing.assert_allclose(
                value, two["params"][name], rtol=1e-5, atol=1e-7, err_msg=name
            )
        for split in ("train", "valid"):
            for name, records in two["metrics"][split].items():
                np.testing.assert_allclose(
                    [r["mean"] for r in report["metrics"][split][name]],
                    [r["mean"] for r in records],
                    rtol=1e-5,
                    err_msg=name,
                )
        for name in ("decoded", "logits"):
            np.testing.assert_allclose(report[name], two[name], rtol=1e-5, atol=1e-6)
    # The replicas of the two processes are the same arrays.
    for name, value in reports[0]["params"].items():
        np.testing.assert_array_equal(value, reports[1]["params"][name])
    # Both processes checkpointed into the one store, as one run.
    last_step = worker.NUM_EPOCHS * (worker.TRAIN_FRAMES // worker.BATCH_SIZE)
    assert (store / str(last_step) / "commit_success.txt").is_file()
