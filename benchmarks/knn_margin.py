"""Does training beat random features? The demo's recipe over several seeds.

Run by hand (never by the tests); about 8 minutes per seed on 2 CPU cores:

    python benchmarks/knn_margin.py --workdir /tmp/dlfb_knn --seeds 0 1 2
    python benchmarks/knn_margin.py --workdir /tmp/dlfb_knn --setting second

For each seed it trains the demo's two models (`demo.DEMO_TRAINING`, with and
without the head: `demo.MODELS`) on the demo's training sample, and
evaluates them, the same model untrained and raw pixels (PCA) on the demo's
unseen proteins: protein-level leave-one-out 5-NN accuracy of the predominant
localization over all proteins ("all") and over the proteins with a single
localization ("single"). It prints, as Markdown, the mean and standard
deviation over the seeds of each embedding, the margins of the trained
models' best embedding over the untrained model's best and over raw pixels,
and the per-epoch codebook loss and perplexity of each run (training health).

`--setting second` uses the generator's second setting (`SyntheticStyle`'s
`SECOND_STYLE`: other cell sizes, intensities, noise and pattern scales), so
that a result is not a property of one generator. `--set NAME=VALUE` overrides
a `RunConfig` field (e.g. `--set lookup=euclidean` for the book's quantizer).
Data and runs are written under `--workdir` and reused when run again.
"""

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from dlfb_localization import demo
from dlfb_localization.dataset.builder import DatasetBuilder
from dlfb_localization.dataset.synthetic import SECOND_STYLE, write_release
from dlfb_localization.evaluate import evaluate
from dlfb_localization.hugepages import restart_with_huge_pages
from dlfb_localization.runs import RunConfig, create_state, train_run

LEVEL = "protein"
# "all": every protein by its predominant localization; "single": proteins
# with one localization only (`evaluate.LABEL_SETS`).
LABEL_SETS = ("all", "single")


def _samples(setting: str):
    if setting == "second":
        return (
            dataclasses.replace(demo.EMBEDDED_SAMPLE, style=SECOND_STYLE),
            dataclasses.replace(demo.EVALUATION_SAMPLE, style=SECOND_STYLE),
        )
    return demo.EMBEDDED_SAMPLE, demo.EVALUATION_SAMPLE


def _accuracies(result: dict, label_set: str) -> dict[str, float]:
    scores = result["knn"][LEVEL][label_set]
    return {
        name: value["accuracy"]
        for name, value in scores.items()
        if value is not None and name != "majority_class"
    }


def _parse_overrides(pairs: list[str]) -> dict:
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    overrides = {}
    for pair in pairs:
        name, _, text = pair.partition("=")
        if name not in fields:
            raise SystemExit(f"--set {pair}: no RunConfig field {name!r}")
        try:
            overrides[name] = json.loads(text)  # numbers, true/false/null, lists
        except json.JSONDecodeError:
            overrides[name] = text  # e.g. lookup=euclidean, augment=none
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dlfb_knn"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--setting", choices=("default", "second"), default="default")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    overrides = _parse_overrides(args.overrides)

    train_spec, eval_spec = _samples(args.setting)
    data = args.workdir / f"data_{args.setting}"
    evaluation_data = args.workdir / f"evaluation_{args.setting}"
    write_release(data, train_spec)
    write_release(evaluation_data, eval_spec)
    evaluation_split = DatasetBuilder(evaluation_data).build(
        rng=0, splits={"evaluation": 1.0}
    )["evaluation"]

    tag = "-".join(f"{k}={v}" for k, v in sorted(overrides.items())) or "defaults"
    models = ("untrained", *demo.MODELS)
    # rows[label_set][model][embedding]: one accuracy per seed.
    rows = {s: {m: {} for m in models} for s in LABEL_SETS}
    health = []
    for seed in args.seeds:
        states = {}
        for name, (_, weight) in demo.MODELS.items():
            settings = {
                **demo.DEMO_TRAINING,
                "classification_weight": weight,
                **overrides,
            }
            config = RunConfig(data=str(data), seed=seed, **settings)
            store = args.workdir / "runs" / args.setting / tag / name / str(seed)
            run = train_run(config, store)
            states[name] = run.state
            states.setdefault("untrained", create_state(run.config, run.splits))
            train = run.metrics["train"]
            health.append(
                (
                    seed,
                    name,
                    [r["mean"] for r in train["codebook_loss"]],
                    [r["mean"] for r in train["perplexity"]],
                )
            )
        for name, state in states.items():
            result = evaluate(state, evaluation_split, random_state=seed)
            for label_set in LABEL_SETS:
                for embedding, accuracy in _accuracies(result, label_set).items():
                    rows[label_set][name].setdefault(embedding, []).append(accuracy)

    def cell(values) -> str:
        spread = f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else ""
        return f"{np.mean(values):.3f}{spread}"

    n = len(args.seeds)
    print(f"\n## {args.setting} generator, {tag}, {n} seeds {args.seeds}\n")
    print(
        f"Protein-level 5-NN accuracy on {evaluation_split.labels.get_n_proteins()} "
        "unseen proteins, mean ± sd over the seeds:\n"
    )
    for label_set in LABEL_SETS:
        table = rows[label_set]
        print(f"| {label_set} | " + " | ".join(models) + " |")
        print("|---|" + "---|" * len(models))
        for embedding in table["untrained"]:
            if embedding == "pixels_pca":
                continue
            print(
                f"| {embedding} | "
                + " | ".join(cell(table[m][embedding]) for m in models)
                + " |"
            )
        pixels = np.array(table["untrained"]["pixels_pca"])
        print(f"| raw pixels (PCA) | {cell(pixels)} |" + " |" * (len(models) - 1))

        def best(names, table=table) -> np.ndarray:
            per_seed = [
                values
                for name in names
                for embedding, values in table[name].items()
                if embedding != "pixels_pca"
            ]
            return np.max(np.array(per_seed), axis=0)

        trained = best(demo.MODELS)
        print(
            f"\n{label_set}: the best trained embedding minus the untrained model's "
            f"best: {cell(trained - best(['untrained']))}; minus raw pixels: "
            f"{cell(trained - pixels)}\n"
        )
    print("| seed | model | codebook loss by epoch | perplexity by epoch |")
    print("|---|---|---|---|")
    for seed, name, losses, perplexity in health:
        print(
            f"| {seed} | {name} | {' '.join(f'{v:.3g}' for v in losses)} | "
            f"{' '.join(f'{v:.0f}' for v in perplexity)} |"
        )


if __name__ == "__main__":
    # Measures what the command line runs: malloc with huge pages, unless
    # GLIBC_TUNABLES says otherwise (`dlfb_localization.hugepages`).
    restart_with_huge_pages()
    main()
