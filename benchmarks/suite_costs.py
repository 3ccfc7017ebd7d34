"""Where the test suite's time goes: JAX's tracing, lowering and compiling, per
test. A pytest plugin, run by hand (never by the suite itself):

    PYTHONPATH=benchmarks .venv/bin/python -m pytest -p suite_costs

Each pytest process (the pytest-xdist workers too) records, per test, its wall
time and what JAX reports through `jax.monitoring` while the test runs: the
seconds spent tracing to a jaxpr, lowering to MLIR and compiling with XLA, and
how many programs were compiled. At the end the first process prints the sums,
each process's busy time (against the session's wall time, so an idle tail
shows) and CPU time, and the 25 tests that cost the most CPU time (below). It
also writes everything as JSON to `$SUITE_COSTS_JSON` if that is set.

It also records each test's CPU time: its own process's (every thread) and
that of the processes it started and waited for (training subprocesses,
racers, notebook kernels), from `getrusage`. On a machine whose cores the
workers keep busy, CPU time is what a test costs the suite; wall time also
counts waiting for a core. A child's CPU time is counted when it is reaped:
a notebook kernel's by the test whose teardown stops it, and that of a child
nobody waited for (the demo's UMAP compilation) by the next test that starts
a process (Python's `subprocess` reaps finished children then). What JAX does
in those other processes is not broken down.
"""

import collections
import json
import os
import resource
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
}
_COUNTED = {"compile_s": "compiles"}
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


def _cpu_seconds() -> tuple[float, float]:
    """User plus system CPU seconds so far: this process's (all its threads)
    and its reaped children's."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (
        own.ru_utime + own.ru_stime,
        children.ru_utime + children.ru_stime,
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _current[0] = item.nodeid
    start, (own, children) = time.perf_counter(), _cpu_seconds()
    yield
    costs = _costs[item.nodeid]
    costs["wall_s"] += time.perf_counter() - start
    own_after, children_after = _cpu_seconds()
    costs["cpu_s"] += own_after - own
    costs["child_cpu_s"] += children_after - children
    _current[0] = _OUTSIDE


def _worker() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


def pytest_sessionfinish(session):
    # The process's CPU outside tests too (start-up, collection), kept apart
    # from the per-test costs, which the first process sums.
    own, children = _cpu_seconds()
    record = {
        "tests": {k: dict(v) for k, v in _costs.items()},
        "cpu_s": own,
        "child_cpu_s": children,
    }
    path = Path(os.environ[_FOLDER_ENV]) / f"{_worker()}.json"
    path.write_text(json.dumps(record))


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
    for record in workers.values():
        for test, values in record["tests"].items():
            totals.update(values)
            per_test[test].update(values)
    write("")
    write(f"JAX costs over the session ({wall:.0f} s of wall time):")
    for name in (*_EVENTS, *_COUNTED.values()):
        write(f"  {name:14s} {totals[name]:9.1f}")
    write("Per process: busy in tests, CPU of its own and of its reaped children")
    write("(the first process's children are the workers, and their children):")
    for worker, record in workers.items():
        busy = sum(c.get("wall_s", 0.0) for c in record["tests"].values())
        write(
            f"  {worker}: busy {busy:.0f} s, CPU {record['cpu_s']:.0f} s"
            f" + {record['child_cpu_s']:.0f} s"
        )
    write("The costliest tests by CPU time (own process + children, in seconds):")
    write(
        f"{'cpu':>6s} {'child':>6s} {'wall':>6s} {'trace':>6s} {'lower':>6s} "
        f"{'compile':>7s} {'n':>4s}  test"
    )
    costliest = sorted(
        per_test.items(), key=lambda item: -(item[1]["cpu_s"] + item[1]["child_cpu_s"])
    )
    for test, c in costliest[:25]:
        write(
            f"{c['cpu_s'] + c['child_cpu_s']:6.1f} {c['child_cpu_s']:6.1f} "
            f"{c['wall_s']:6.1f} {c['trace_s']:6.1f} {c['lower_s']:6.1f} "
            f"{c['compile_s']:7.1f} {int(c['compiles']):4d}  {test}"
        )
    target = os.environ.get("SUITE_COSTS_JSON")
    if target:
        Path(target).write_text(
            json.dumps(
                {"wall_s": wall, "workers": workers, "totals": dict(totals)}, indent=1
            )
        )
