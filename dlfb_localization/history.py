"""The training history: per-step scalars gathered into per-epoch records.

`HistoryLogger` is the step logger `train` and every family's loop write to;
`History` is what it exports (`history[split][name]`, one record per epoch), what
checkpoints store and what `inspect.metrics` plots."""

from collections import defaultdict
from collections.abc import Mapping, Sequence

import jax
import numpy as np

# `history[split][name]` is a list of records, one per summarised epoch.
Record = dict[str, float]
History = dict[str, dict[str, list[Record]]]


class HistoryLogger:
    """Collects step metrics on the device and summarises them once per epoch.

    Steps return scalar arrays that may still be computing; keeping them as they
    are and calling `jax.device_get` once per `flush` lets the host run ahead of
    the device instead of waiting after every step.

    Each step carries a weight (its batch size), so a partial last batch counts
    for what it holds: the epoch mean of a per-frame quantity (the losses, the
    accuracy) is then its mean over frames. Perplexity and the codebook-usage
    metrics are per-batch quantities; their summary is the batch-size-weighted
    mean of per-batch values.

    Args:
      history: a previous `export()` to continue from (a resumed run).
    """

    def __init__(self, history: History | None = None):
        self._history: dict[str, dict[str, list[Record]]] = defaultdict(
            lambda: defaultdict(list)
        )
        for split, by_name in (history or {}).items():
            for name, records in by_name.items():
                self._history[split][name] = [dict(r) for r in records]
        self._pending: dict[str, list[tuple[Mapping[str, jax.Array], float]]] = (
            defaultdict(list)
        )

    def log_step(
        self, split: str, metrics: Mapping[str, jax.Array], weight: float = 1.0
    ) -> None:
        """Queues one step's scalar metrics (not transferred to the host yet).

        Args:
          split: e.g. "train" or "valid".
          metrics: name to scalar array.
          weight: the step's batch size (or any positive weight).
        """
        self._pending[split].append((dict(metrics), float(weight)))

    def flush(self, epoch: int) -> dict[str, dict[str, np.ndarray]]:
        """Summarises the queued steps of each split as records for `epoch`.

        Args:
          epoch: the epoch the queued steps belong to.

        Returns:
          The per-step host values, `values[split][name]` `[steps]` float64, in
          the order they were logged (e.g. to locate a non-finite step).
        """
        pending, self._pending = self._pending, defaultdict(list)
        # One transfer for everything queued this epoch.
        host = jax.device_get({split: steps for split, steps in pending.items()})
        values: dict[str, dict[str, np.ndarray]] = {}
        for split, steps in host.items():
            if not steps:
                continue
            weights = np.array([weight for _, weight in steps])
            values[split] = {
                name: np.array([float(m[name]) for m, _ in steps])
                for name in steps[0][0]
            }
            for name, per_step in values[split].items():
                mean = np.average(per_step, weights=weights)
                std = np.sqrt(np.average((per_step - mean) ** 2, weights=weights))
                self._history[split][name].append(
                    {"mean": float(mean), "std": float(std), "epoch": int(epoch)}
                )
        return values

    def record(self, split: str, epoch: int, values: Mapping[str, float]) -> None:
        """Adds one record per name for `epoch` (a value known once per epoch,
        such as a health flag; its std is 0)."""
        for name, value in values.items():
            self._history[split][name].append(
                {"mean": float(value), "std": 0.0, "epoch": int(epoch)}
            )

    def history(self) -> History:
        """The records so far (not copied: read, do not change)."""
        return self._history

    def latest(
        self, names: Sequence[str] = ("total_loss",), split: str = "train"
    ) -> str:
        """A short "name=mean" string of the latest records, for a progress bar."""
        parts = []
        for name in names:
            records = self._history.get(split, {}).get(name)
            if records:
                parts.append(f"{name}={records[-1]['mean']:.4g}")
        return " ".join(parts)

    def export(self) -> History:
        """`history[split][name]` = list of `{"mean", "std", "epoch"}` records.

        Plain Python types only, so the result can be written as JSON.
        """
        return {
            split: {
                name: [dict(r) for r in records] for name, records in by_name.items()
            }
            for split, by_name in self._history.items()
        }
