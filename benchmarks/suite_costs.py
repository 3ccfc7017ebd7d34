"""Where the test suite's time goes: JAX's tracing, lowering and compiling, per
test. A pytest plugin, run by hand (never by the suite itself):

    PYTHONPATH=benchmarks .venv/bin/python -m pytest -p suite_costs

Each pytest process (the pytest-xdist workers too) records, per test, its wall
time and what JAX reports through `jax.monitoring` while the test runs: the
seconds spent tracing to a jaxpr, lowering to MLIR and compiling with XLA, how
many programs were compiled, and the persistent compilation cache's reads and
the compile time they saved. At the end the first process prints the sums, the
tests that cost the most and each worker's busy time (against the session's
wall time, so an idle tail shows). It also writes everything as JSON to
`$SUITE_COSTS_JSON` if that is set.

Not recorded: what runs in other processes the tests start (training
subprocesses, notebook kernels); their time shows only as the wall time of
the test that waits for them.
"""

import collections
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import jax
import pytest

_EVENTS = {
    "trace_s": "/jax/core/compile/jaxpr_trace_duration",
    "lower_s": "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "compile_s": "/jax/core/compile/backend_compile_duration",
    "cache_read_s": "/jax/compilation_cache/cache_retrieval_time_sec",
    "cache_saved_s": "/jax/compilation_cache/compile_time_saved_sec",
}
_COUNTED = {"compile_s": "compiles", "cache_read_s": "cache_hits"}
_FOLDER_ENV = "SUITE_COSTS_DIR"
_OUTSIDE = "(between tests)"

_current = [_OUTSIDE]
_costs: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
_by_event = {event: name for name, event in _EVENTS.items()}


def _listener(event: str, duration: float, **_) -> None:
    name = _by_event.get(event)
    if name is None:
        return
    costs = _costs[_current[0]]
    costs[name] += duration
    if name in _COUNTED:
        costs[_COUNTED[name]] += 1


jax.monitoring.register_event_duration_secs_listener(_listener)


def pytest_configure(config):
    # Made by the first process, inherited by the workers it starts.
    if _FOLDER_ENV not in os.environ:
        os.environ[_FOLDER_ENV] = tempfile.mkdtemp(prefix="suite-costs-")
    config._suite_costs_start = time.perf_counter()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _current[0] = item.nodeid
    start = time.perf_counter()
    yield
    _costs[item.nodeid]["wall_s"] += time.perf_counter() - start
    _current[0] = _OUTSIDE


def _worker() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


def pytest_sessionfinish(session):
    path = Path(os.environ[_FOLDER_ENV]) / f"{_worker()}.json"
    path.write_text(json.dumps({k: dict(v) for k, v in _costs.items()}))


def pytest_terminal_summary(terminalreporter, config):
    if _worker() != "main":
        return
    wall = time.perf_counter() - config._suite_costs_start
    workers = {
        path.stem: json.loads(path.read_text())
        for path in sorted(Path(os.environ[_FOLDER_ENV]).glob("*.json"))
    }
    shutil.rmtree(os.environ[_FOLDER_ENV], ignore_errors=True)
    write = terminalreporter.write_line
    totals = collections.Counter()
    per_test: dict[str, collections.Counter] = collections.defaultdict(
        collections.Counter
    )
    for costs in workers.values():
        for test, values in costs.items():
            totals.update(values)
            per_test[test].update(values)
    write("")
    write(f"JAX costs over the session ({wall:.0f} s of wall time):")
    for name in (*_EVENTS, *_COUNTED.values()):
        write(f"  {name:14s} {totals[name]:9.1f}")
    write(
        "  busy per process: "
        + ", ".join(
            f"{worker} {sum(c.get('wall_s', 0.0) for c in costs.values()):.0f} s"
            for worker, costs in workers.items()
        )
    )
    write(f"{'wall':>7s} {'trace':>6s} {'lower':>6s} {'compile':>7s} {'n':>4s}  test")
    costliest = sorted(per_test.items(), key=lambda item: -item[1]["wall_s"])
    for test, c in costliest[:25]:
        write(
            f"{c['wall_s']:7.1f} {c['trace_s']:6.1f} {c['lower_s']:6.1f} "
            f"{c['compile_s']:7.1f} {int(c['compiles']):4d}  {test}"
        )
    target = os.environ.get("SUITE_COSTS_JSON")
    if target:
        Path(target).write_text(
            json.dumps(
                {"wall_s": wall, "workers": workers, "totals": dict(totals)}, indent=1
            )
        )
