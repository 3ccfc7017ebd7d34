"""What decides a training run, recorded as JSON, and how two records compare.

`build_run_config` (the VQ families) and `describe_train_state` (any family's
train state) record everything that decides a run's result and can be
recorded: the model's class and hyperparameters, fingerprints of the initial
parameters and of the optimizer's first update, the training arguments, the
data's fingerprints, the key, and the caller's own settings.
`find_config_differences` names the fields where a stored record and the
current one differ, treating array fingerprints as equal up to float rounding
(a run written on a GPU is recognised on a CPU). `checkpoint` stores the record
beside each step and refuses a run whose record differs.
"""

import dataclasses
import functools
import hashlib
import logging
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState

from dlfb_localization.model.interface import model_of

logger = logging.getLogger(__name__)

__all__ = [
    "ConfigMismatchError",
    "build_run_config",
    "describe_run",
    "describe_train_state",
    "find_config_differences",
    "rng_record",
    "to_json",
    "tree_sha256",
]

# Fingerprints of arrays are compared up to this fraction of the array's L1 norm:
# far above float32 rounding differences between backends (a GPU-written run
# restores on a CPU), far below the difference between two random inits.
_FINGERPRINT_TOLERANCE = 1e-6
_FINGERPRINT_FLOOR = 1e-12
_FINGERPRINT_FIELDS = {
    "init_params": "the stored run started from other initial parameters "
    "(another seed or initializer?)",
    "optimizer.probe_update": "the stored run's optimizer makes a different first "
    "update (another learning rate or optimizer setting?)",
}
_CHUNK = 1 << 22
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


class ConfigMismatchError(ValueError):
    """The checkpoint folder holds a run with a different configuration."""


def to_json(value: Any) -> Any:
    """Plain JSON types (dict, list, str, int, float, bool, None) only."""
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_json(dataclasses.asdict(value))  # e.g. CodebookOptions
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, np.ndarray | jax.Array):
        return to_json(np.asarray(value).tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.dtype) or (
        isinstance(value, type) and hasattr(value, "dtype")
    ):
        return str(np.dtype(value))  # e.g. a model's dtype=jnp.bfloat16
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot store {type(value).__name__} as JSON: {value!r}")


def _fingerprint(tree: Any) -> dict[str, Any]:
    """A SHA-256 of a tree's arrays plus a rounding-tolerant summary.

    The summary holds, per leaf, the dot product with a fixed +-1 pattern and the
    L1 norm (both float64). Two random inits differ in the projection by about
    the leaf's scale times sqrt(size); recomputing on another backend changes it
    by at most rounding error times the L1 norm.
    """
    projections, norms = [], []
    for leaf in jax.tree.leaves(tree):
        flat = np.ravel(jax.device_get(leaf))
        projection, norm = 0.0, 0.0
        for start in range(0, flat.size, _CHUNK):
            chunk = flat[start : start + _CHUNK].astype(np.float64)
            index = np.arange(start, start + chunk.size, dtype=np.uint64)
            signs = 1.0 - 2.0 * ((index * _GOLDEN) >> np.uint64(63))
            projection += float(signs @ chunk)
            norm += float(np.abs(chunk).sum())
        projections.append(projection)
        norms.append(norm)
    return {"sha256": tree_sha256(tree), "projections": projections, "norms": norms}


def tree_sha256(tree: Any) -> str:
    """The SHA-256 of a tree's arrays: each leaf's path, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        values = np.ascontiguousarray(jax.device_get(leaf))
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(f"{values.dtype}{values.shape}".encode())
        digest.update(values.tobytes())
    return digest.hexdigest()


def _same_fingerprint(stored: Mapping, current: Mapping) -> bool:
    if stored.get("sha256") == current.get("sha256"):
        return True
    keys = ("projections", "norms")
    if any(len(stored.get(k, ())) != len(current[k]) for k in keys):
        return False
    for p_old, p_new, n_old, n_new in zip(
        stored["projections"],
        current["projections"],
        stored["norms"],
        current["norms"],
        strict=True,
    ):
        # The floor keeps all-zero leaves (biases) comparable.
        tolerance = _FINGERPRINT_TOLERANCE * max(n_old, n_new) + _FINGERPRINT_FLOOR
        if abs(p_old - p_new) > tolerance or abs(n_old - n_new) > tolerance:
            return False
    return True


def _describe_model(state: TrainState) -> dict[str, Any]:
    """The model's class and hyperparameters (`interface.model_of`)."""
    try:
        module = model_of(state)
    except TypeError:
        function = state.apply_fn
        return {"apply_fn": f"{function.__module__}.{function.__qualname__}"}
    cls = type(module)
    fields = {
        f.name: getattr(module, f.name)
        for f in dataclasses.fields(module)
        if f.name not in ("parent", "name")
    }
    return {"class": f"{cls.__module__}.{cls.__qualname__}", **fields}


def build_run_config(
    state: TrainState,
    rng: jax.Array,
    dataset_splits: Mapping[str, Any],
    *,
    num_epochs: int,
    batch_size: int,
    classification_weight: float,
    eval_every: int,
    augment: str = "none",
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything recordable that decides a run's result, as plain JSON.

    Args:
      state: the initial `TrainState`: its model hyperparameters, a fingerprint
        of its parameters, its optimizer-state structure, and a fingerprint of
        the update the optimizer makes from it for a gradient of ones, which
        catches e.g. a changed learning rate (optax hides it in closures).
      rng: the run's JAX key (its key data is stored).
      dataset_splits: the splits; "train" and "valid" are fingerprinted.
      num_epochs, batch_size, classification_weight, eval_every, augment:
        `train`'s arguments.
      settings: the caller's own description of the run, recorded and
        compared whole (`runs.train_run` passes its `RunConfig`).

    Returns:
      A JSON-ready dict.
    """
    return describe_run(
        {"model": state},
        rng,
        {name: dataset_splits[name] for name in ("train", "valid")},
        settings,
        num_epochs=num_epochs,
        batch_size=batch_size,
        classification_weight=classification_weight,
        eval_every=eval_every,
        augment=augment,
    )


def describe_run(
    states: Mapping[str, TrainState],
    rng: jax.Array,
    splits: Mapping[str, Any],
    settings: Mapping[str, Any] | None = None,
    **arguments: Any,
) -> dict[str, Any]:
    """What decides a run of any family, as plain JSON.

    Args:
      states: the initial train state of each network, by name. One network's
        description (`describe_train_state`) sits at the top level; several
        sit under their names (e.g. a GAN's "generator" and "discriminator").
      rng: the run's JAX key.
      splits: the `Dataset`s trained (and validated) on, by name: their
        fingerprints are recorded, and the first one's image shape.
      settings: the caller's own description of the run, compared whole.
      **arguments: the training function's arguments that decide the result.

    Returns:
      A JSON-ready dict.
    """
    if len(states) == 1:
        described = describe_train_state(next(iter(states.values())))
    else:
        described = {name: describe_train_state(s) for name, s in states.items()}
    first = next(iter(splits.values()))
    # Plain types (tuples as lists), so it compares equal to what JSON reads back.
    return to_json(
        {
            **described,
            **arguments,
            "data": {name: split.fingerprint for name, split in splits.items()},
            "input_shape": list(first.image_shape),
            "rng": rng_record(rng),
            "settings": dict(settings or {}),
        }
    )


def describe_train_state(state: TrainState) -> dict[str, Any]:
    """What decides a run about its initial `TrainState`, as plain JSON.

    Returns:
      `{"model": class and hyperparameters, "optimizer": {"state_structure",
      "state_shapes", "probe_update"}, "init_params": fingerprint}`, where
      "probe_update" fingerprints the update the optimizer makes from the
      state for a gradient of ones (it catches e.g. a changed learning rate,
      which optax hides in closures). `find_config_differences` compares the
      fingerprints up to float rounding wherever they sit in a configuration.
    """
    opt_leaves, opt_structure = jax.tree.flatten(state.opt_state)
    probe_update = _probe_update(state.tx, state.opt_state, state.params)
    return to_json(
        {
            "model": _describe_model(state),
            "optimizer": {
                "state_structure": str(opt_structure),
                "state_shapes": [
                    [list(np.shape(x)), str(getattr(x, "dtype", type(x).__name__))]
                    for x in opt_leaves
                ],
                "probe_update": _fingerprint(probe_update),
            },
            "init_params": _fingerprint(state.params),
        }
    )


@functools.partial(jax.jit, static_argnums=0)
def _probe_update(tx: optax.GradientTransformation, opt_state, params):
    """The optimizer's update for a gradient of ones, in one compiled program
    per optimizer and parameter shapes (made op by op, the ones compiled a
    program per parameter shape at every run)."""
    update, _ = tx.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
    return update


def rng_record(rng: jax.Array) -> list:
    """A run's JAX key as JSON (its key data)."""
    return np.asarray(jax.random.key_data(rng)).tolist()


# Fields added after runs were already written. A setting maps to the value
# those runs had implicitly: such a run is still recognised, and one trained
# otherwise is refused naming the field. `_NOT_RECORDED` marks a record that
# older runs simply lack (what it holds was already compared field by field).
_NOT_RECORDED = object()
_ADDED_FIELDS = {"model.codebook.lookup": "euclidean", "settings": _NOT_RECORDED}


def find_config_differences(stored: Any, current: Any, path: str = "") -> list[str]:
    """Dotted names of the fields where two run configurations differ.

    Fingerprints of arrays (initial parameters, optimizer probe) count as equal
    when they agree up to float rounding, so a run written on one backend is
    recognised on another.

    Returns:
      e.g. `["batch_size: stored 4, now 8"]`; empty when the runs match.
    """
    field = _fingerprint_field(path)
    if field is not None and isinstance(stored, Mapping):
        if isinstance(current, Mapping) and _same_fingerprint(stored, current):
            if stored.get("sha256") != current.get("sha256"):
                logger.info("%s equal up to float rounding (another backend?)", path)
            return []
        return [f"{path}: {_FINGERPRINT_FIELDS[field]}"]
    if isinstance(stored, Mapping) and isinstance(current, Mapping):
        differences = []
        for key in sorted(set(stored) | set(current)):
            name = f"{path}.{key}" if path else key
            if key not in stored and _ADDED_FIELDS.get(name) is _NOT_RECORDED:
                continue
            if key not in stored and name in _ADDED_FIELDS:
                # Written before the field existed: it had the old behaviour.
                differences += find_config_differences(
                    _ADDED_FIELDS[name], current[key], name
                )
            elif key not in stored or key not in current:
                differences.append(
                    f"{name}: only in the {'run' if key in current else 'stored run'}"
                )
            else:
                differences += find_config_differences(stored[key], current[key], name)
        return differences
    if stored != current:
        return [f"{path}: stored {_shorten(stored)}, now {_shorten(current)}"]
    return []


def _fingerprint_field(path: str) -> str | None:
    """The fingerprint field `path` is, at the top or inside a section (e.g. a
    GAN's "generator.init_params"), or None."""
    for field in _FINGERPRINT_FIELDS:
        if path == field or path.endswith(f".{field}"):
            return field
    return None


def _shorten(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
