"""Tiny data sets written in the real on-disk formats, a shared tiny training
run, and the session's compilation settings: fast tests on a 2-core CPU."""

import os
import sys

# Python writes the bytecode of the modules the tests import (into the venv and
# the checkout's __pycache__), also where PYTHONDONTWRITEBYTECODE is set: the
# README's test command installs without `--compile-bytecode` (which compiles
# every installed module, 31 s on 2 cores), so the first process compiles what
# the session imports and the workers, kernels and subprocesses (which inherit
# the environment) read it, instead of each compiling jax and scipy again.
sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

import contextlib
import functools
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jax
import matplotlib
import numpy as np
import pandas as pd
import pytest
from filelock import FileLock

from dlfb_localization.dataset.sources import LABEL_COLUMNS
from dlfb_localization.hugepages import huge_pages_environment

matplotlib.use("Agg")
# One device and no preallocation keep tests fast and isolated on a 2-core CPU.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# A folder of the session that every pytest-xdist worker sees (`built_once`).
_SHARED_ENV = "DLFB_TESTS_SHARED_DIR"
_session_cache: list[str] = []
# The process compiling UMAP's numba code for the session (`_compile_umap`).
_umap_compile: list[subprocess.Popen] = []


def _xla_accepts(flags: list[str]) -> bool:
    """Whether a JAX process starts with these XLA flags."""
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; jax.devices()"],
        env={**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        timeout=120,
    )
    return probe.returncode == 0


def pytest_configure(config):
    """Compile less and faster: compiling, not running, dominates these tiny
    models' tests on a CPU. Worker processes and notebook kernels inherit it.

    XLA's backend (LLVM) optimization level 0 instead of the default 3
    compiles these tiny models about 20% faster in all (measured on
    tests/test_train.py and tests/test_model.py: 59 s against 72 s at level 2,
    the level used before) and runs them about as fast, as they are too small
    for optimized code to matter; results agree with the default up to float
    rounding. It is set before anything starts XLA; a level already in
    XLA_FLAGS is kept. XLA's older CPU fusion code generator
    (`--xla_cpu_use_fusion_emitters=false`, the default until 2025) compiles
    them about 20% faster again (train state and step of the chapter's and
    cytoself's tiny models: 11.7 s against 14.6 s). One LLVM module per
    program (`--xla_cpu_parallel_codegen_split_count=1`) instead of parts
    compiled on parallel threads saves about 8% of a compilation's CPU time
    (train and eval steps of both tiny models at two batch sizes: 28.6 and
    29.8 s against 31.6 and 32.5 s): the workers keep both cores busy, so the
    parallel threads only add work. XLA stops at an unknown flag, so these two
    are used only if a JAX process starts with them.

    No persistent JAX compilation cache: one served the whole session until
    its cost was measured, with JAX's cache write timed in every process of
    a run (workers, training subprocesses, notebook kernels): writing every
    program cost 21.5 s, while its 221 hits saved 10.7 s of compiling net of
    reading them. It only ever saved the backend compile, not the tracing
    and lowering, which a hit still pays.

    glibc's malloc takes transparent huge pages in every process but this
    one (`dlfb_localization.hugepages`): fewer page faults in the steps and
    compilations, and the suite about 8% faster (interleaved on 2 cores: 315
    and 332 s against 341 and 356 s).
    """
    flags = os.environ.get("XLA_FLAGS", "").split()
    if not any("xla_backend_optimization_level" in flag for flag in flags):
        flags.append("--xla_backend_optimization_level=0")
    optional = [
        flag
        for flag in (
            "--xla_cpu_use_fusion_emitters=false",
            "--xla_cpu_parallel_codegen_split_count=1",
        )
        if flag.split("=")[0] not in " ".join(flags)
    ]
    if optional and _xla_accepts([*flags, *optional]):
        flags.extend(optional)
    else:
        flags.extend(flag for flag in optional if _xla_accepts([*flags, flag]))
    os.environ["XLA_FLAGS"] = " ".join(flags)

    # Huge pages for malloc, as the command line takes them
    # (`dlfb_localization.hugepages`): inherited by the workers, the
    # processes they start and the notebook kernels.
    huge_pages = huge_pages_environment(os.environ)
    if huge_pages is not None:
        os.environ["GLIBC_TUNABLES"] = huge_pages["GLIBC_TUNABLES"]

    # Made by the first process (the controller, before it starts the workers),
    # inherited by the workers; removed with the session.
    if _SHARED_ENV not in os.environ:
        shared = tempfile.mkdtemp(prefix="dlfb-tests-shared-")
        _session_cache.append(shared)
        os.environ[_SHARED_ENV] = shared

    # numba, for UMAP: its compiled code is kept in a cache of the session's
    # (`projection.umap_module` caches UMAP's functions), so that one process
    # compiles what the others load, and a run never depends on an earlier one.
    # Keep numba's default optimisation: at NUMBA_OPT=0, 20 of pynndescent's
    # functions keep "dynamic globals" and cannot be cached, so every process
    # compiled them again (importing UMAP: 15 s instead of 2.7 s in a second
    # process; an AlignedUMAP of 96 frames: 18.6 s instead of 7.0 s).
    # It must be set before numba is imported; nothing here imports it.
    if "NUMBA_CACHE_DIR" not in os.environ:
        numba_cache = tempfile.mkdtemp(prefix="dlfb-numba-cache-")
        _session_cache.append(numba_cache)
        os.environ["NUMBA_CACHE_DIR"] = numba_cache

    if "PYTEST_XDIST_WORKER" not in os.environ and _runs_whole_suite(config):
        _compile_umap()
    _wait_for_umap()


# Modules holding the suite's longest single tests (20-30 s each on 2 cores,
# `pytest --durations=15`). `test_data_parallel.py` draws no UMAP, so it leads
# while UMAP's code is still being compiled (`_compile_umap`); `test_vit_run.py`
# draws its UMAP only after its training.
_LONGEST_FIRST = (
    "test_data_parallel.py",
    "test_vit_run.py",
    "test_compare.py",
    "test_demo.py",
)


def pytest_collection_modifyitems(config, items):
    """Runs the modules of the longest tests first, each module's tests in
    their order (a stable sort).

    pytest-xdist's worksteal gives each worker a contiguous half of the
    collection, and an idle worker takes tests from the end of the other's
    half: a long test collected last starts last, and the other worker sits
    idle while it runs. Alphabetically, `test_vit_run.py`'s 28 s test was the
    last one: the other worker finished 18 s earlier. Collected first, a long
    test runs while the other worker still has its half to do.
    """
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def _umap_lock() -> Path:
    return Path(os.environ[_SHARED_ENV]) / "umap-compile.lock"


def _runs_whole_suite(config) -> bool:
    """Whether the session runs the test folder, not chosen files or tests."""
    tests = Path(__file__).parent.resolve()
    return all(Path(arg).resolve() == tests for arg in config.args)


def _compile_umap() -> None:
    """Starts a process that compiles UMAP's numba code into the session's
    cache (`tests/_compile_umap.py`, `projection.compile_umap`) while the
    workers start and run their first tests.

    Compiled cold, it costs about 45 s of a core, and every process that
    reached its first UMAP before another had cached the code compiled it
    again: a notebook kernel's first AlignedUMAP took 40 s, against 19 s from
    the cache. The process holds a lock for as long as it compiles, which the
    test processes' first UMAP waits for (`_wait_for_umap`), so the code is
    compiled once. Only where the whole suite runs: a run of a few tests does
    not pay for what it may not use.
    """
    script = Path(__file__).with_name("_compile_umap.py")
    _umap_compile.append(
        subprocess.Popen(
            [sys.executable, str(script), str(_umap_lock())],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )


def _wait_for_umap() -> None:
    """Makes this process's first UMAP (`projection.umap_module`) wait while
    `_compile_umap`'s process holds its lock; without one it goes on at once.
    Notebook kernels are not patched: they start late in the session, when
    the code is long cached."""
    from dlfb_localization import projection

    set_up = projection.umap_module

    @functools.cache
    def wait():
        with FileLock(str(_umap_lock())):
            pass

    def umap_module():
        wait()
        return set_up()

    projection.umap_module = umap_module


def pytest_unconfigure(config):
    for process in _umap_compile:
        process.kill()
        process.wait()
    for path in _session_cache:
        shutil.rmtree(path, ignore_errors=True)
        for name in ("NUMBA_CACHE_DIR", _SHARED_ENV):
            if os.environ.get(name) == path:
                del os.environ[name]


LOCS = [
    "er",
    "mitochondria;cytoplasmic",
    "nucleoplasm",
    "chromatin",
    "golgi",
    "vesicles",
]


def assert_same_tree(a, b) -> None:
    """Two pytrees of the same structure with bitwise equal leaves."""
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def encoding_indices(state, images) -> np.ndarray:
    """The chapter model's code indices of `images`, recomputed apart from the
    library's batching, in one jitted call (op by op, it compiled ~40
    programs)."""
    from dlfb_localization.model import LocalizationModel

    def encode(params, x):
        return state.apply_fn(
            {"params": params}, x, method=LocalizationModel.get_encoding_indices
        )

    return np.asarray(jax.jit(encode)(state.params, images))


def latest_checkpoint_meta(checkpoints: Path) -> dict:
    """The metadata of the newest checkpoint in the folder `checkpoints`."""
    from dlfb_localization import checkpoint

    manager = checkpoint.open_manager(checkpoints)
    try:
        return checkpoint.read_meta(manager, manager.latest_step())
    finally:
        manager.close()


def write_tiny_release(
    path: Path,
    n_proteins: int = 6,
    fovs_per_protein: int = 3,
    frames_per_fov: int = 4,
    n_blocks: int = 2,
    size: int = 16,
    seed: int = 0,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Writes Image_dataNN.npy / Label_dataNN.csv; returns all images and labels.

    Pixels are random, so every frame is distinguishable; protein ids are
    non-consecutive (10, 13, 16, …) so class encoding is exercised.
    """
    rng = np.random.default_rng(seed)
    rows = []
    fov = 100
    for p in range(n_proteins):
        for _ in range(fovs_per_protein):
            for _ in range(frames_per_fov):
                rows.append(
                    {
                        "ensg": f"ENSG9{p:010d}",
                        "name": f"GENE{p}",
                        "loc_grade1": LOCS[p % len(LOCS)],
                        "loc_grade2": "golgi" if p % 4 == 0 else "",
                        "loc_grade3": "",
                        "protein_id": 10 + 3 * p,
                        "FOV_id": fov,
                    }
                )
            fov += 1
    labels = pd.DataFrame(rows, columns=list(LABEL_COLUMNS))
    images = rng.random((len(labels), size, size, 4), dtype=np.float32)
    path.mkdir(parents=True, exist_ok=True)
    for i, idx in enumerate(np.array_split(np.arange(len(labels)), n_blocks)):
        np.save(path / f"Image_data{i:02d}.npy", images[idx])
        labels.iloc[idx].to_csv(path / f"Label_data{i:02d}.csv", index=False)
    return images, labels


@pytest.fixture
def tiny_release(tmp_path):
    """A fresh tiny release folder: (path, images [n,16,16,4], labels table)."""
    images, labels = write_tiny_release(tmp_path / "release")
    return tmp_path / "release", images, labels


@pytest.fixture(scope="module")
def module_tiny_release(tmp_path_factory):
    """`tiny_release`, written once for a module's tests that only read it."""
    path = tmp_path_factory.mktemp("module") / "release"
    images, labels = write_tiny_release(path)
    return path, images, labels


@contextlib.contextmanager
def built_once(name: str) -> Iterator[tuple[Path, bool]]:
    """`(folder, build)`: a folder of this test session shared by all
    pytest-xdist workers, and whether the caller must build what it holds.

    A session fixture is built once per worker; what is costly to build (a
    training, a subprocess run) and only read afterwards is built here once
    per session instead. The first caller builds while holding the folder's
    lock (`build` is True); the others wait for it and find it built (False).
    A build that raises leaves the folder to be built again by the next caller.
    """
    root = Path(os.environ[_SHARED_ENV])
    folder = root / name
    built = root / f"{name}.built"
    with FileLock(str(root / f"{name}.lock")):
        build = not built.exists()
        if build:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
        yield folder, build
        built.touch()


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """The seeded run of `_train_worker.py`, shared (read only) by the
    checkpoint and data-parallel tests: (store_path, state, metrics).

    Trained once in the session (`built_once`): the trained state's arrays and
    the metrics are saved beside its store, as training returned them (not as
    a restore gives them back), and every worker gets its own copy of the
    store, since tests run `train` on it and a folder has one writer at a time.
    """
    import _train_worker as worker

    with built_once("reference") as (built, build):
        if build:
            state, metrics = worker.run(built / "store")
            leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(state)]
            np.savez(built / "state.npz", *leaves)
            (built / "metrics.json").write_text(json.dumps(metrics))
    store_path = tmp_path_factory.mktemp("reference") / "store"
    shutil.copytree(built / "store", store_path)
    with np.load(built / "state.npz") as saved:
        leaves = [jax.device_put(saved[f"arr_{i}"]) for i in range(len(saved.files))]
    # The structure only: `eval_shape` traces the state without initialising it.
    state = jax.tree.unflatten(
        jax.tree.structure(jax.eval_shape(worker.make_state)), leaves
    )
    metrics = json.loads((built / "metrics.json").read_text())
    return store_path, state, metrics
