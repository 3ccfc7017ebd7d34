"""Data parallelism: two (forced host) devices train like one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import _train_worker as worker
import jax
import numpy as np

WORKER = Path(__file__).with_name("_train_worker.py")


def _report(tmp_path, n_devices):
    env = dict(os.environ)
    devices = f"--xla_force_host_platform_device_count={n_devices}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path / f"run{n_devices}"), "--report"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    line = next(line for line in out.splitlines() if line.startswith("REPORT "))
    report = json.loads(line.removeprefix("REPORT "))
    with np.load(tmp_path / f"run{n_devices}" / "outputs.npz") as outputs:
        report.update(outputs)
    return report


def _one_device_report(reference_run, tmp_path):
    """The one-device side. When this process is one CPU device, that is the
    session's reference run (the same seeded worker run, trained here); else a
    worker process with one forced host device, like the two-device side."""
    if jax.default_backend() != "cpu" or jax.device_count() != 1:
        return _report(tmp_path, 1)
    _, state, metrics = reference_run
    outputs = worker.predict_valid(state, worker.make_splits())
    return {"devices": jax.device_count(), "metrics": metrics, **outputs}


def test_two_devices_give_the_metrics_of_one(reference_run, tmp_path):
    one, two = _one_device_report(reference_run, tmp_path), _report(tmp_path, 2)
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
