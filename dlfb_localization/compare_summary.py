"""The model comparison's numbers: per-seed scores summarised over seeds,
and the table (`compare.md`) that shows them."""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["METRICS", "format_table", "summarise", "summarise_scores"]

# What the table reports of each embedding: protein-level k-NN of the
# predominant localization ("all" label set) and the multi-label probe.
METRICS = {
    "knn_accuracy": "protein k-NN accuracy",
    "knn_macro_f1": "protein k-NN macro-F1",
    "probe_macro_f1": "probe macro-F1",
    "probe_macro_ap": "probe macro AP",
}


def summarise(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof 1; None below two values) of
    the defined values, with the values themselves (None where undefined)."""
    defined = [v for v in values if v is not None]
    return {
        "mean": float(np.mean(defined)) if defined else None,
        "std": float(np.std(defined, ddof=1)) if len(defined) > 1 else None,
        "n": len(defined),
        "values": list(values),
    }


def _metrics(scores: dict, embedding: str) -> dict[str, float | None]:
    """`METRICS` of one embedding in `score_localization`'s result."""
    knn = scores["knn"]["protein"]["all"].get(embedding)
    probe = scores["probe"].get(embedding)
    return {
        "knn_accuracy": None if knn is None else knn["accuracy"],
        "knn_macro_f1": None if knn is None else knn["macro_f1"],
        "probe_macro_f1": None if probe is None else probe["macro_f1"],
        "probe_macro_ap": None if probe is None else probe["macro_average_precision"],
    }


def summarise_scores(results: Mapping[str, Sequence[dict]]) -> dict[str, Any]:
    """`{"scores", "chance", "n_proteins", "n_probe_proteins"}` of
    `compare.compare`'s result.

    Args:
      results: `{candidate: [evaluate.score_localization result per seed]}`,
        all scored on the same frames, seeds in the same order.
    """
    scores: dict[str, dict] = {}
    for name, per_seed in results.items():
        scores[name] = {
            embedding: {
                metric: summarise(
                    [
                        _metrics(seed_scores, embedding)[metric]
                        for seed_scores in per_seed
                    ]
                )
                for metric in METRICS
            }
            for embedding in per_seed[0]["probe"]
        }
    first = next(iter(results.values()))
    probe = [seed_scores["labels"]["probe"] for seed_scores in first]
    chance = {
        "knn_accuracy": summarise([_chance_knn(seed_scores) for seed_scores in first]),
        "probe_macro_f1": summarise([p["chance_macro_f1"] for p in probe]),
        "probe_macro_ap": summarise([p["chance_average_precision"] for p in probe]),
    }
    return {
        "scores": scores,
        "chance": chance,
        "n_proteins": first[0]["labels"]["all"]["n_proteins"],
        "n_probe_proteins": probe[0]["n_proteins"],
    }


def _chance_knn(scores: dict) -> float | None:
    majority = scores["knn"]["protein"]["all"]["majority_class"]
    return None if majority is None else majority["accuracy"]


def _cell(summary: dict) -> str:
    if summary["mean"] is None:
        return "-"
    if summary["std"] is None:
        return f"{summary['mean']:.3f}"
    return f"{summary['mean']:.3f} ± {summary['std']:.3f}"


def format_table(result: dict) -> str:
    """`compare.md`: one row per candidate and embedding, mean ± standard
    deviation over the seeds, with the epochs and training minutes."""
    seeds = result["settings"]["seeds"]
    lines = [
        "# Model comparison",
        "",
        f"Scored on {result['n_proteins']} unseen proteins (probe: "
        f"{result['n_probe_proteins']} annotated); mean ± standard deviation "
        f"over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}). A run on "
        "another machine differs within about that spread.",
        "",
        "| candidate | embedding | epochs | training min | "
        + " | ".join(METRICS.values())
        + " |",
        "|" + " --- |" * (4 + len(METRICS)),
    ]
    for name, embeddings in result["scores"].items():
        info = result["candidates"][name]
        epochs, minutes = "-", "-"
        if "epochs" in info:
            epochs = str(info["epochs"])
            spent = [s for s in info["training_seconds"] if s is not None]
            if spent:
                minutes = f"{np.mean(spent) / 60:.1f}"
        for embedding, metrics in embeddings.items():
            cells = [_cell(metrics[metric]) for metric in METRICS]
            lines.append(
                f"| {info['title']} | {embedding} | {epochs} | {minutes} | "
                + " | ".join(cells)
                + " |"
            )
    chance = result["chance"]
    lines += [
        "",
        f"Chance: protein k-NN accuracy {_cell(chance['knn_accuracy'])} (the "
        f"majority class); probe macro-F1 {_cell(chance['probe_macro_f1'])} "
        "(every protein called positive for every localization) and macro AP "
        f"{_cell(chance['probe_macro_ap'])} (the localizations' mean prevalence).",
        "",
    ]
    if result["settings"]["epochs"] is None:
        lines.append(
            f"Each trained run was given about {result['settings']['minutes']:g} "
            "minute(s) of training on the machine that calibrated it (its epochs "
            "from its timed training step, `calibration.json`)."
        )
    else:
        lines.append(f"Each trained run trained {result['settings']['epochs']} epochs.")
    return "\n".join(lines) + "\n"
