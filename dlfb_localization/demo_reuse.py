"""What a second run of the demo can reuse: an evaluation or the figures
computed from the same models and data.

Beside each evaluation (`evaluation/<model>.json`) and beside the figures
(`figures/`) the demo writes what they were computed from
(`<file>.inputs.json`): the parameters' bytes, the evaluation data's
fingerprint and the library's version. A rerun reuses what was computed from
the same inputs.
"""

import json
from pathlib import Path

from dlfb_localization import __version__
from dlfb_localization.run_record import tree_sha256

__all__ = ["evaluation_path", "inputs_of", "inputs_path", "reuse", "reused_figures"]


def evaluation_path(out: Path, name: str) -> Path:
    return out / "evaluation" / f"{name}.json"


def inputs_of(state, split) -> dict:
    """What an evaluation or a figure of `state` on `split` depends on: the
    parameters' bytes, the split's fingerprint and the library's version."""
    return {
        "params_sha256": tree_sha256(state.params),
        "data": split.fingerprint,
        "version": __version__,
    }


def inputs_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.inputs.json")


# What the report reads of an evaluation: one stored before `evaluate` gave
# all of these (the probe came later) is computed again, even from the same
# model and data, rather than reported with a hole.
_REPORTED = frozenset({"labels", "knn", "probe", "cluster_score", "codebook"})


def reuse(path: Path, inputs: dict) -> dict | None:
    """The result stored at `path` if it was computed from `inputs` and holds
    everything the report reads, else None."""
    if not (path.is_file() and inputs_path(path).is_file()):
        return None
    if json.loads(inputs_path(path).read_text()) != inputs:
        return None
    result = json.loads(path.read_text())
    if not result.keys() >= _REPORTED:
        return None
    return result


def reused_figures(out: Path, inputs: dict) -> dict[str, Path] | None:
    """The figures in `out/figures` if they were drawn from models and data with
    these `inputs` and are all there, else None."""
    record = inputs_path(out / "figures")
    if not record.is_file():
        return None
    stored = json.loads(record.read_text())
    written = {key: out / path for key, path in stored["figures"].items()}
    if stored["inputs"] != inputs or not all(p.is_file() for p in written.values()):
        return None
    if "map" not in written:  # drawn before figures included map.html
        return None
    return written
