"""2-D UMAP projections of frame embeddings (numbers only, no plotting).

`project_2d` is the one plain UMAP of the package, with one set of settings:
`evaluate`'s cluster score and `calculate_projection` (the chapter's,
re-exported by `inspect.embeddings.clustering`, which draws the result) both
run it; `calculate_projection` runs an AlignedUMAP, with the same settings, for
several embedding sets. UMAP is imported on first use, and numba's compiled
code for it is kept on disk (`umap_module`).
"""

import contextlib
import functools
import itertools
import sys
import threading
import types
import warnings
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import numpy as np

__all__ = [
    "UMAP_MIN_DIST",
    "UMAP_NEIGHBORS",
    "Projection",
    "calculate_projection",
    "compile_umap",
    "frame_id_relations",
    "project_2d",
]

UMAP_NEIGHBORS = 15
UMAP_MIN_DIST = 0.1
# UMAP computes every pairwise distance of a set smaller than this; a larger
# one's neighbours it searches for approximately (pynndescent).
_UMAP_ALL_PAIRS_BELOW = 4096


def umap_module():
    """`umap`, imported, with numba's compiled code of its functions cached on
    disk. Threads may call it at the same time (`demo` evaluates and draws at
    once): the first one sets it up, the others wait for it.

    numba compiles UMAP's functions again in every new process: on a CPU that
    takes tens of seconds (a UMAP of a few hundred frames: 15 s; an AlignedUMAP:
    22 s), most of what a small `evaluate` or `figures` costs. umap-learn does
    not ask numba to cache them; this does, for UMAP's and pynndescent's
    functions (numba's `Dispatcher.enable_caching`, as `cache=True` would), so
    a later process loads them instead (0.7 s and 11 s). The cache is numba's:
    `NUMBA_CACHE_DIR` if set, else `__pycache__` beside umap's sources or the
    user's cache folder. numba keys an entry by its source file, its argument
    types and the CPU, writes it through a temporary file, and compiles what
    it cannot cache as before. Imported here, not at the module's import, to
    keep numba off the import path.
    """
    with _SETTING_UP:
        return _set_up_umap()


_SETTING_UP = threading.Lock()


@functools.cache
def _set_up_umap():
    import umap
    import umap.aligned_umap  # its functions are cached too
    import umap.layouts
    from numba.core.dispatcher import Dispatcher

    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(("umap", "pynndescent")):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, Dispatcher):
                value.enable_caching()
    umap.layouts.numba = _KeptDispatchers(umap.layouts.numba)
    umap.umap_.warn = _quieted(umap.umap_.warn)
    # numba says so when a function whose caching was enabled above cannot be
    # cached (two of them: they are compiled in each process, as without it).
    warnings.filterwarnings(
        "ignore",
        message="Cannot cache compiled function",
        module=r".*[/\\](umap|pynndescent)[/\\]",
    )
    return umap


class _KeptDispatchers(types.ModuleType):
    """A copy of the `numba` module for `umap.layouts`, whose `njit(function,
    **options)` returns one dispatcher per function and options, cached on
    disk, instead of a new one at each call.

    `umap.layouts.optimize_layout_aligned_euclidean` (AlignedUMAP's layout)
    wraps its epoch function in `numba.njit(..., parallel=True)` at every
    call, so every AlignedUMAP compiled it again: 3.3 s a call, 6 s for the
    first in a process, on a 2-core CPU (an AlignedUMAP of 2 x 120 frames in
    a process whose other functions come from the cache: 10.3 s, then 4.2 s;
    with this, 4.2 s, then 0.9 s). It is a module, holding numba's own
    attributes, because numba compiles the layouts' functions that name
    `numba.prange`. numba's cache keys an entry by the function and its
    argument types, not by the options; umap passes the same options at every
    call.
    """

    def __init__(self, numba: types.ModuleType):
        super().__init__(numba.__name__, numba.__doc__)
        self.__dict__.update(
            (name, value)
            for name, value in vars(numba).items()
            if name not in ("__name__", "__doc__", "njit")
        )
        self._numba = numba
        self._dispatchers = {}

    def njit(self, *args, **options):
        if len(args) != 1 or not callable(args[0]):  # a decorator factory
            return self._numba.njit(*args, **options)
        key = (args[0], tuple(sorted(options.items())))
        if key not in self._dispatchers:
            self._dispatchers[key] = self._numba.njit(args[0], cache=True, **options)
        return self._dispatchers[key]


def compile_umap() -> None:
    """Compiles the numba code that `project_2d` and `calculate_projection`
    run (or loads it from numba's cache, `umap_module`), by projecting a small
    random set both ways: later projections in this process, and in processes
    that share the cache, then start at once.

    A cold compile takes about 45 s of one CPU core (importing UMAP 21 s, a
    first UMAP 11 s, a first AlignedUMAP 18 s), most of it holding
    Python's lock, so it is best done while the process waits on other work:
    the demo runs it in a thread while its models train. From a warm cache it
    takes about 5 s. Safe to call from several threads (numba compiles each
    function once per process).
    """
    rng = np.random.default_rng(0)
    # Two loose groups in 16 dimensions, as the float32 arrays the package
    # projects: one connected graph, as real embeddings give.
    points = rng.normal(size=(120, 16)).astype(np.float32)
    points[::2] += 3.0
    frame_ids = np.arange(len(points))
    project_2d(points)
    calculate_projection(
        {
            name: {"frame_ids": frame_ids, "frame_histograms": points + shift}
            for name, shift in (("a", 0.0), ("b", 0.1))
        }
    )


def project_2d(
    features: np.ndarray,
    *,
    metric: str = "euclidean",
    random_state: int = 0,
    n_neighbors: int = UMAP_NEIGHBORS,
    min_dist: float = UMAP_MIN_DIST,
) -> np.ndarray:
    """A seeded 2-D UMAP (single-threaded, hence reproducible).

    Args:
      features: `[n, d]` embeddings, n >= 3.
      metric: any UMAP metric (`evaluate` passes the features and metric of
        `evaluate.to_metric_space`).
      random_state: seed of UMAP.
      n_neighbors: neighbourhood size (capped below the set size).
      min_dist: minimum distance between embedded points.

    Returns:
      `[n, 2]` coordinates, as UMAP returns them.
    """
    umap = umap_module()
    (data,), metric = _umap_inputs([np.asarray(features)], metric)
    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=max(2, min(n_neighbors, len(features) - 1)),
        min_dist=min_dist,
        metric=metric,
        random_state=random_state,
        n_jobs=1,
    )
    with _quiet_umap():
        return reducer.fit_transform(data)


# Where a fit of this module's runs (`_quiet_umap`), per thread.
_FITTING = threading.local()
# What umap says of what this module asks of it on purpose: distances passed
# as "precomputed" (`_umap_inputs`) leave it without an inverse transform,
# which nothing here uses; AlignedUMAP builds UMAPs with n_jobs=-1 and a seed,
# so they run single-threaded, the reproducibility asked for.
_UMAP_NOTICES = ("using precomputed metric", "n_jobs value")


@contextlib.contextmanager
def _quiet_umap() -> Iterator[None]:
    """A UMAP fit in this thread without umap's notices of `_UMAP_NOTICES`
    (`_quieted`)."""
    _FITTING.active = True
    try:
        yield
    finally:
        _FITTING.active = False


def _quieted(warn):
    """umap's `warn`, which drops `_UMAP_NOTICES` in a thread inside
    `_quiet_umap` and passes on everything else.

    Not `warnings.catch_warnings`: it replaces the process's one list of
    filters on entry and puts back the list it found on exit, so another
    thread inside it at the same time (the demo fits UMAPs while scikit-learn,
    which uses it, scores embeddings) removes the filters while a fit runs,
    or leaves them in place for good.
    """

    @functools.wraps(warn)
    def quiet_warn(message, category=None, stacklevel=1, source=None):
        if getattr(_FITTING, "active", False) and str(message).startswith(
            _UMAP_NOTICES
        ):
            return
        warn(message, category, stacklevel + 1, source)

    return quiet_warn


def _umap_inputs(sets: list[np.ndarray], metric: str) -> tuple[list[np.ndarray], str]:
    """`(inputs, metric)` to give UMAP (or AlignedUMAP) for the point sets
    `sets` under `metric`: where UMAP would compare all pairs of every set
    by Euclidean distance, the distances it would compute, as "precomputed";
    else `(sets, metric)`.

    For such a set UMAP calls scikit-learn's `pairwise_distances` with its
    numba metric, which scikit-learn then calls once per pair from Python: 3.9 s
    for the demo's 1,174 frames, holding Python's lock (the demo's
    evaluations and figures ran nine of them). umap's own
    `distances.pairwise_special_metric` loops over the pairs in numba with the
    same metric function (0.1 s); in float32, as scikit-learn returns them,
    its distances are the same to the bit, and UMAP's graph and layout from them
    are the same (`tests/test_embeddings.py`).
    """
    # Only the Euclidean metric (what the package projects with, Hellinger
    # included, `scoring.to_metric_space`): for some others, e.g. cosine,
    # UMAP also cuts edges longer than a bound that it does not apply to
    # precomputed distances.
    if metric != "euclidean" or max(map(len, sets)) >= _UMAP_ALL_PAIRS_BELOW:
        return sets, metric
    umap = umap_module()
    # UMAP takes points as float32, and scikit-learn returns their distances
    # in float32.
    inputs = [
        umap.distances.pairwise_special_metric(
            np.asarray(points, dtype=np.float32), metric=metric
        ).astype(np.float32)
        for points in sets
    ]
    return inputs, "precomputed"


class Projection(NamedTuple):
    """A 2-D projection of frames.

    Attributes:
      frame_ids: `[n]` int64 frame ids, in the order of the embeddings.
      coordinates: `[n, 2]` float32 positions.
    """

    frame_ids: np.ndarray
    coordinates: np.ndarray


def frame_id_relations(
    frame_ids_a: np.ndarray, frame_ids_b: np.ndarray
) -> dict[int, int]:
    """AlignedUMAP relations between two embedding sets: row in a -> row in b.

    Rows are matched by frame id, not by position, so two sets in different
    orders (or with different frames) are still aligned frame by frame.

    Args:
      frame_ids_a: `[n_a]` frame ids of the first set (unique).
      frame_ids_b: `[n_b]` frame ids of the second set (unique).

    Returns:
      `{row_a: row_b}` for every frame id the two sets share.
    """
    frame_ids_a, frame_ids_b = np.asarray(frame_ids_a), np.asarray(frame_ids_b)
    for ids in (frame_ids_a, frame_ids_b):
        if len(np.unique(ids)) != len(ids):
            raise ValueError("frame ids within one embedding set must be unique")
    _, rows_a, rows_b = np.intersect1d(
        frame_ids_a, frame_ids_b, assume_unique=True, return_indices=True
    )
    return dict(zip(rows_a.tolist(), rows_b.tolist(), strict=True))


def _is_single(frame_embeddings: Mapping) -> bool:
    return "frame_ids" in frame_embeddings


def calculate_projection(
    frame_embeddings: Mapping,
    *,
    random_state: int = 42,
    feature: str = "frame_histograms",
    metric: str = "euclidean",
    n_neighbors: int = UMAP_NEIGHBORS,
    min_dist: float = UMAP_MIN_DIST,
) -> Projection | dict[str, Projection]:
    """UMAP of one embedding set, or AlignedUMAP of several.

    For one set (the dict `get_frame_embeddings` returns) this is a plain UMAP.
    For a dict of name -> set (e.g. models with and without the classification
    head, as in the chapter), an AlignedUMAP keeps frames that the sets share
    at similar positions in every panel, so the panels can be compared; frames
    are matched by frame id (`frame_id_relations`), so the sets need not be in
    the same order.

    One set is projected by `project_2d`. UMAP runs single-threaded with
    `random_state`, so results are reproducible. The first call in a process
    compiles UMAP's numba code (tens of seconds).

    Args:
      frame_embeddings: one `get_frame_embeddings` dict, or name -> such dicts.
      random_state: seed of UMAP (the chapter's 42; `evaluate`'s cluster
        score uses its own `random_state`, 0 by default).
      feature: which per-frame array to project ("frame_histograms", the
        chapter's, or "frame_vectors").
      metric: UMAP's distance ("euclidean" as in the chapter; `evaluate`'s
        cluster score uses `evaluate.EMBEDDING_METRICS`, Hellinger for
        histograms).
      n_neighbors: UMAP's neighbourhood size (capped below the set size).
      min_dist: UMAP's minimum distance between embedded points.

    Returns:
      A `Projection` for one set; name -> `Projection` (same order) for several.
    """
    if _is_single(frame_embeddings):
        coordinates = project_2d(
            np.asarray(frame_embeddings[feature], dtype=np.float32),
            metric=metric,
            random_state=random_state,
            n_neighbors=n_neighbors,
            min_dist=min_dist,
        )
        return Projection(
            frame_ids=np.asarray(frame_embeddings["frame_ids"], dtype=np.int64),
            coordinates=coordinates.astype(np.float32),
        )

    names = list(frame_embeddings)
    if len(names) < 2:
        raise ValueError(
            "pass one get_frame_embeddings dict, or a dict of at least two of them "
            f"to align; got the name(s) {names}"
        )
    sets = [frame_embeddings[name] for name in names]
    relations = [
        frame_id_relations(a["frame_ids"], b["frame_ids"])
        for a, b in itertools.pairwise(sets)
    ]
    for (name_a, name_b), relation in zip(
        itertools.pairwise(names), relations, strict=True
    ):
        if not relation:
            raise ValueError(
                f"{name_a!r} and {name_b!r} share no frame id, so there is nothing "
                "to align them by; embed the same split with both models"
            )
    umap = umap_module()
    data, metric = _umap_inputs(
        [np.asarray(s[feature], dtype=np.float32) for s in sets], metric
    )
    smallest = min(len(s["frame_ids"]) for s in sets)
    reducer = umap.AlignedUMAP(
        n_components=2,
        n_neighbors=max(2, min(n_neighbors, smallest - 1)),
        min_dist=min_dist,
        metric=metric,
        random_state=random_state,
    )
    with _quiet_umap():
        reducer.fit(data, relations=relations)
    return {
        name: Projection(
            frame_ids=np.asarray(s["frame_ids"], dtype=np.int64),
            coordinates=np.asarray(coordinates, dtype=np.float32),
        )
        for name, s, coordinates in zip(names, sets, reducer.embeddings_, strict=True)
    }
