"""The demo's report (`report.md`): its tables of numbers, training health and
figures, written from the runs' records and evaluations (`demo.run`)."""

from pathlib import Path

# The k-NN table's columns: (level, label set).
_KNN_COLUMNS = (
    ("protein", "all"),
    ("protein", "nine"),
    ("protein", "single"),
    ("frame", "all"),
    ("frame", "nine"),
)


# The probe's columns: (metric, title).
_PROBE_COLUMNS = (("macro_f1", "macro-F1"), ("macro_average_precision", "macro AP"))


def _probe_labels(labels: dict) -> str:
    """A line on what the probe scored, its chance AP, or why it is empty."""
    if labels["reason"] is not None:
        return f"Probe: no scores ({labels['reason']})."
    excluded = labels["excluded_classes"]
    left_out = (
        " Left out, held by too few proteins to be spread over two folds "
        "(proteins holding each): "
        + ", ".join(f"{name} ({n})" for name, n in excluded.items())
        + "."
        if excluded
        else ""
    )
    return (
        f"Probe: {_count(labels['n_classes_scored'], 'localization')} of "
        f"{labels['n_proteins']} annotated proteins, {labels['n_splits']} folds. "
        f"Chance: macro AP {_number(labels['chance_average_precision'])} (the "
        "localizations' mean prevalence), macro-F1 "
        f"{_number(labels['chance_macro_f1'])} (calling every localization "
        f"everywhere).{left_out}"
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _number(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def _training_health(runs, titles) -> list[str]:
    """Markdown lines: each run's per-epoch codebook loss and perplexity."""
    lines = [
        "## Training health",
        "",
        "Per-epoch means over the training batches: the codebook loss should be "
        "flat or falling after the first epoch and the perplexity (codes in "
        "effective use, of "
        f"{next(iter(runs.values())).config.num_embeddings}) should not collapse.",
        "",
        "| model | codebook loss, epoch 1 → last | perplexity, epoch 1 → last |",
        "|---|---|---|",
    ]
    for name, run in runs.items():
        train = run.metrics["train"]
        losses = " → ".join(f"{r['mean']:.4f}" for r in train["codebook_loss"])
        perplexity = " → ".join(f"{r['mean']:.0f}" for r in train["perplexity"])
        lines.append(f"| {titles[name]} | {losses} | {perplexity} |")
    return [*lines, ""]


def report_markdown(
    configs,
    runs,
    results,
    figures,
    out: Path,
    seconds: dict,
    *,
    models,
    untrained,
    sample,
    embeddings,
    map_model,
) -> str:
    """`report.md` of the demo: what ran, the k-NN and probe table, training
    health, codebook use and the figures.

    Args:
      configs, runs, results: the demo's `RunConfig`s, `TrainedRun`s and
        evaluations, by model name (`results` starts with `untrained`).
      figures: the figures' paths by key; `out`: the run folder they are in.
      seconds: each stage's time.
      models: `{name: (title, classification weight)}` of the trained models.
      untrained: `(name, title)` of the untrained model (the only one whose
        pixel baseline is shown).
      sample: the training sample's `SyntheticSpec`.
      embeddings: the embeddings to tabulate.
      map_model: the model `map.html` shows.
    """
    titles = {untrained[0]: untrained[1], **{n: t for n, (t, _) in models.items()}}
    # The settings of the demo's family only (`RunConfig.to_json`).
    config = next(iter(configs.values())).to_json()
    config.pop("classification_weight")
    reference = next(iter(results.values()))
    lines = [
        "# dlfb-localization demo",
        "",
        f"Embedded sample: {sample.n_proteins} proteins, "
        f"{len(next(iter(runs.values())).splits['train'])} training frames. "
        f"Evaluated on {reference['n_frames']} frames of {reference['n_proteins']} "
        "unseen proteins (`evaluation_data/`). Run took "
        f"{sum(seconds.values()) / 60:.1f} min ("
        + ", ".join(f"{stage} {s:.0f} s" for stage, s in seconds.items())
        + ").",
        "",
        "Training: " + ", ".join(f"{k}={v}" for k, v in config.items() if k != "data"),
        "",
        "classification_weight: "
        + ", ".join(f"{titles[n]} {w}" for n, (_, w) in models.items()),
        "",
        "## Localization k-NN (k=5)",
        "",
        "Accuracy of predicting a protein's predominant localization from its "
        "neighbours: at protein level each protein's mean embedding, leave-one-out; "
        'at frame level leave-one-protein-out. "all": every annotated '
        'localization is a class; "nine": the chapter\'s nine; "single": only '
        "proteins with a single localization (for the others the predominant one "
        "is a judgement between two). Histograms are compared by the Hellinger "
        "distance. Cluster score: UMAP of the frames of the nine (higher is "
        "tighter). Macro-F1 is in `report.json`.",
        "",
        "Probe: a linear model per localization (standardized features, "
        "logistic regression) reads all of a protein's grade-1 and grade-2 "
        "localizations off its mean embedding, 5-fold cross-validated over "
        "proteins; macro-F1 and macro average precision (AP) of its out-of-fold "
        "predictions, the metrics SubCell and its peers report on OpenCell. On "
        "this synthetic sample they do not compare with published numbers.",
        "",
        f"These are one run's numbers (seed {config['seed']}). They move with the "
        "seed, and with the machine (XLA's float order differs between CPUs): "
        "README.md gives the k-NN's mean and spread over three seeds, and another "
        "run lands within about that spread; the probe's spread over seeds has "
        "not been measured.",
        "",
        "| model | embedding | "
        + " | ".join(f"{level}, {label_set}" for level, label_set in _KNN_COLUMNS)
        + " | "
        + " | ".join(f"probe, {title}" for _, title in _PROBE_COLUMNS)
        + " | cluster score |",
        "|---|---|" + "---|" * (len(_KNN_COLUMNS) + len(_PROBE_COLUMNS)) + "---|",
    ]
    for name, result in results.items():
        for embedding in embeddings:
            if embedding == "pixels_pca" and name != untrained[0]:
                continue
            cells = [
                _number(
                    (result["knn"][level][label_set][embedding] or {}).get("accuracy")
                )
                for level, label_set in _KNN_COLUMNS
            ]
            probe = result["probe"][embedding] or {}
            cells += [_number(probe.get(metric)) for metric, _ in _PROBE_COLUMNS]
            score = result["cluster_score"]["predominant"][embedding]
            label = "raw pixels (PCA)" if embedding == "pixels_pca" else titles[name]
            lines.append(
                f"| {label} | {embedding} | "
                + " | ".join(cells)
                + f" | {_number(score)} |"
            )
    labels = reference["labels"]["all"]
    chance = {
        level: reference["knn"][level]["all"]["majority_class"]
        for level in ("protein", "frame")
    }
    lines += [
        "",
        f"{labels['n_classes']} classes. Majority class: protein "
        f"{_number(chance['protein'] and chance['protein']['accuracy'])}, frame "
        f"{_number(chance['frame'] and chance['frame']['accuracy'])}. Accuracy "
        "ceilings (a class held by one protein cannot be predicted): protein "
        f"{_number(labels['protein_accuracy_ceiling'])}, frame "
        f"{_number(labels['frame_accuracy_ceiling'])}.",
        "",
        _probe_labels(reference["labels"]["probe"]),
        "",
        *_training_health(runs, titles),
        "## Codebook and reconstruction",
        "",
        "| model | perplexity | codes used | largest share | reconstruction MSE |",
        "|---|---|---|---|---|",
    ]
    for name, result in results.items():
        codebook = result["codebook"]
        lines.append(
            f"| {titles[name]} | {codebook['perplexity']:.1f} | "
            f"{codebook['used_fraction']:.2f} | {codebook['max_share']:.3f} | "
            f"{result['reconstruction_mse']:.4f} |"
        )
    lines += ["", "## Figures", ""]
    for path in figures.values():
        if path.suffix == ".html":  # a page to open, not an image to embed
            page = path.relative_to(out)
            lines += [
                f"[{page}]({page}): interactive map of the unseen proteins in the "
                f"embedding of the {titles[map_model]} model. Open it in a browser "
                "(one file, works offline); hover a protein for a crop and its "
                "localizations, click it for its nearest proteins.",
                "",
            ]
    lines += [
        f"![{key}]({path.relative_to(out)})"
        for key, path in figures.items()
        if path.suffix == ".png"
    ]
    lines += [
        "",
        "Numbers: `report.json` (all of them, also per model in `evaluation/`).",
        "",
    ]
    return "\n".join(lines)
