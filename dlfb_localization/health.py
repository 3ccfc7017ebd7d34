"""Training health: is the codebook learning, or is the run going wrong?

A VQ-VAE can fail quietly: the reconstruction keeps falling while the encoder's
outputs run away from the codebook (the codebook loss grows epoch after epoch),
or while fewer and fewer codes are used. Either leaves an embedding worse than
an untrained model's. `check_health` reads `train`'s per-epoch metrics after
every epoch and names what it sees, with the numbers and the remedy, so that a
run going wrong is seen at its second epoch rather than at its end.

The checks, each on the training split's per-epoch means, per codebook (the
full model's `_local` and `_global` levels are checked separately):

- "codebook_drift": the codebook loss (the squared distance from the encoder's
  outputs to their codes) rose from the previous epoch and is more than
  `DRIFT_RATIO` times its lowest value so far.
- "perplexity_collapse": the perplexity (the effective number of codes used)
  fell below `COLLAPSE_RATIO` of its highest value so far.
- "dead_codes": more than `DEAD_SHARE` of the codebook went unused in a batch,
  on average over the epoch.
"""

import dataclasses
import re
import sys
import warnings

from tqdm.auto import tqdm

from dlfb_localization.history import History, HistoryLogger
from dlfb_localization.model.interface import level_suffix

__all__ = [
    "CHECKS",
    "HealthIssue",
    "TrainingHealthWarning",
    "check_health",
    "health_metrics",
    "watch_health",
]

CHECKS = ("codebook_drift", "perplexity_collapse", "dead_codes")
DRIFT_RATIO = 1.5
COLLAPSE_RATIO = 0.5
DEAD_SHARE = 0.75

_REMEDY = {
    "codebook_drift": (
        "the encoder's outputs are running away from the codebook; use the cosine "
        'lookup (CodebookOptions(lookup="cosine"), the default; --lookup cosine), '
        "EMA codebook updates (--ema-decay 0.99) or a lower learning rate"
    ),
    "perplexity_collapse": (
        "training is using fewer and fewer codes; restart dead codes "
        "(--restart-dead-codes), start from k-means (--kmeans-init) or lower "
        "--classification-weight"
    ),
    "dead_codes": (
        "most codes are never chosen; restart dead codes (--restart-dead-codes), "
        "start from k-means (--kmeans-init) or use fewer codes (--num-embeddings)"
    ),
}


class TrainingHealthWarning(UserWarning):
    """`train` saw a run going wrong (see `check_health`)."""


@dataclasses.dataclass(frozen=True)
class HealthIssue:
    """One failed check at one epoch.

    Attributes:
      check: one of `CHECKS`.
      level: the codebook's suffix: "" for the chapter's model, "local" or
        "global" for the full model's levels.
      epoch: the epoch (0-based) the check failed at.
      message: what was seen, with the numbers, and the remedy.
    """

    check: str
    level: str
    epoch: int
    message: str


def _means(history: History, name: str) -> list[float]:
    return [record["mean"] for record in history.get("train", {}).get(name, [])]


def _levels(history: History) -> list[str]:
    """The codebook levels with a recorded codebook loss ("" for the total,
    or a one-level model's; a level's suffix otherwise), in recorded order."""
    levels = []
    for name in history.get("train", {}):
        match = re.fullmatch(r"codebook_loss(?:_(\w+))?", name)
        if match:
            levels.append(match.group(1) or "")
    return levels


def _check_level(history: History, level: str) -> list[HealthIssue]:
    suffix = level_suffix(level)
    where = f" ({level} codebook)" if level else ""
    issues = []
    losses = _means(history, f"codebook_loss{suffix}")
    epoch = len(losses) - 1  # every series has one record per epoch
    if len(losses) >= 2:
        lowest = min(losses[:-1])
        if losses[-1] > losses[-2] and losses[-1] > DRIFT_RATIO * lowest:
            norms = _means(history, f"latent_norm{suffix}")
            codes = _means(history, f"codebook_norm{suffix}")
            detail = ""
            if len(norms) == len(losses) and len(codes) == len(losses):
                detail = (
                    f"; encoder output norm {norms[0]:.3g} -> {norms[-1]:.3g}, "
                    f"code norm {codes[0]:.3g} -> {codes[-1]:.3g}"
                )
            trend = " -> ".join(f"{value:.3g}" for value in losses)
            issues.append(
                HealthIssue(
                    "codebook_drift",
                    level,
                    epoch,
                    f"codebook loss{where} rising: {trend} by epoch{detail}: "
                    + _REMEDY["codebook_drift"],
                )
            )
    perplexity = _means(history, f"perplexity{suffix}")
    if len(perplexity) >= 2:
        best = max(perplexity[:-1])
        if perplexity[-1] < COLLAPSE_RATIO * best:
            issues.append(
                HealthIssue(
                    "perplexity_collapse",
                    level,
                    epoch,
                    f"perplexity{where} fell from {best:.1f} to "
                    f"{perplexity[-1]:.1f}: " + _REMEDY["perplexity_collapse"],
                )
            )
    used = _means(history, f"codebook_used_fraction{suffix}")
    if used and 1 - used[-1] > DEAD_SHARE:
        issues.append(
            HealthIssue(
                "dead_codes",
                level,
                epoch,
                f"{1 - used[-1]:.0%} of the codes{where} unused in a batch: "
                + _REMEDY["dead_codes"],
            )
        )
    return issues


def check_health(history: History) -> list[HealthIssue]:
    """The checks that fail at the latest epoch of `history` (`train`'s
    metrics; see the module's docstring), for every codebook it reports."""
    return [
        issue for level in _levels(history) for issue in _check_level(history, level)
    ]


def health_metrics(issues: list[HealthIssue]) -> dict[str, float]:
    """0/1 flags `health_<check>` (failed at any level), for the history."""
    failed = {issue.check for issue in issues}
    return {f"health_{check}": float(check in failed) for check in CHECKS}


def watch_health(history: HistoryLogger, epoch: int) -> str:
    """Runs `check_health` after an epoch: records its flags, warns
    (`TrainingHealthWarning`) when a check starts failing, and returns the
    progress bar's text."""
    issues = check_health(history.history())
    flags = health_metrics(issues)
    previous = {
        name: records[-1]["mean"]
        for name in flags
        if (records := history.history()["train"].get(name))
    }
    history.record("train", epoch, flags)
    for issue in issues:
        if not previous.get(f"health_{issue.check}"):
            # Attributed to the caller of `train` (here <- loop.fit <- train);
            # the progress bars are cleared while it prints, then redrawn.
            with tqdm.external_write_mode(file=sys.stderr):
                warnings.warn(
                    f"epoch {epoch + 1}: {issue.message}", TrainingHealthWarning, 4
                )
    text = history.latest(["total_loss", "perplexity"])
    failed = sorted({issue.check for issue in issues})
    return text + (f" | unhealthy: {', '.join(failed)}" if failed else "")
