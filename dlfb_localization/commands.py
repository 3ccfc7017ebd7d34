"""What each `dlfb-localization` command does, given its parsed flags (`cli`
builds the parser and reports errors). Each imports the library it needs when
it runs, so `--help` stays fast."""

import argparse
import json
from pathlib import Path

from dlfb_localization.settings import from_flags


def prepare(args: argparse.Namespace) -> None:
    from dlfb_localization.dataset.utils import get_dataset

    dataset = get_dataset(
        args.data_dir,
        channels=args.channels,
        cache_dir=args.cache_dir,
        force_recreate=args.force,
        trust_pickled_labels=args.trust_pickled_labels,
        progress=True,
        cache_dtype=args.cache_dtype,
    )
    print(f"{args.data_dir}: {dataset}")


def demo(args: argparse.Namespace) -> None:
    from dlfb_localization import demo as demo_module

    demo_module.run(args.out, seed=args.seed)


def compare(args: argparse.Namespace) -> None:
    from dlfb_localization.compare import compare as compare_runs
    from dlfb_localization.compare_summary import format_table

    result = compare_runs(
        args.data,
        args.eval_data,
        args.out,
        candidates=args.candidates,
        seeds=args.seeds,
        minutes=args.minutes,
        epochs=args.epochs,
        k=args.k,
    )
    print(format_table(result))
    print(f"wrote {args.out / 'compare.md'}, compare.json and compare.png")


def config_from_args(config_class, args: argparse.Namespace):
    """`config_class` (a dataclass with a `data` folder) from the parsed flags
    named like its fields."""
    if not args.data.is_dir():
        what = "a file" if args.data.exists() else "missing"
        raise FileNotFoundError(f"--data {args.data} is not a folder ({what})")
    return from_flags(config_class, args)


def train(args: argparse.Namespace) -> None:
    from dlfb_localization.runs import RunConfig, train_run

    config = config_from_args(RunConfig, args)
    run = train_run(config, args.store)
    last = {name: values[-1]["mean"] for name, values in run.metrics["valid"].items()}
    print(
        f"trained {config.num_epochs} epochs into {args.store}: valid "
        + ", ".join(f"{k}={v:.4g}" for k, v in sorted(last.items()))
    )


def evaluate(args: argparse.Namespace) -> None:
    from dlfb_localization.evaluate import evaluate as evaluate_run
    from dlfb_localization.runs import load_run

    run = load_run(args.store, progress=True, data=args.data)
    out = args.out or args.store / f"evaluation_{args.split}.json"
    result = evaluate_run(
        run.state, run.splits[args.split], k=args.k, out_path=out, progress=True
    )
    print(knn_summary(result, args.split, args.k))
    print(probe_summary(result))
    print(f"codebook: {json.dumps(result['codebook'])}")
    print(f"wrote {out}")


def knn_summary(result: dict, split: str, k: int) -> str:
    """The k-NN accuracies of `evaluate`'s result ("all" label set) with what
    they mean: how many proteins and classes, chance and the ceiling."""
    labels = result["labels"]["all"]
    lines = [
        f"{split}: {result['n_frames']} frames of {result['n_proteins']} proteins, "
        f"{labels['n_proteins']} annotated, {labels['n_classes']} localizations"
    ]
    for level in ("protein", "frame"):
        scores = result["knn"][level]["all"]
        ceiling = labels[f"{level}_accuracy_ceiling"]
        chance = scores["majority_class"]
        accuracies = ", ".join(
            f"{name} {score['accuracy']:.3f}"
            for name, score in scores.items()
            if score is not None and name != "majority_class"
        )
        chance = "-" if chance is None else f"{chance['accuracy']:.3f}"
        ceiling = "-" if ceiling is None else f"{ceiling:.3f}"
        lines.append(
            f"{level}-level {k}-NN accuracy: {accuracies or 'undefined'} "
            f"(chance {chance}, ceiling {ceiling})"
        )
    return "\n".join(lines)


def probe_summary(result: dict) -> str:
    """The probe's macro AP and macro-F1 per embedding of `evaluate`'s result,
    with its chance AP and what it was scored on (or why it was not)."""
    labels = result["labels"]["probe"]
    if labels["reason"] is not None:
        return f"protein-level probe: undefined ({labels['reason']})"
    scores = {name: s for name, s in result["probe"].items() if s is not None}
    excluded = labels["excluded_classes"]
    return (
        f"protein-level probe ({labels['n_classes_scored']} grade 1-2 "
        f"localizations, {labels['n_splits']}-fold"
        + (f", {len(excluded)} too rare left out" if excluded else "")
        + "): macro AP "
        + ", ".join(
            f"{n} {s['macro_average_precision']:.3f}" for n, s in scores.items()
        )
        + f" (chance {labels['chance_average_precision']:.3f}); macro-F1 "
        + ", ".join(f"{n} {s['macro_f1']:.3f}" for n, s in scores.items())
    )


def embed(args: argparse.Namespace) -> None:
    from dlfb_localization.embeddings import get_frame_embeddings
    from dlfb_localization.export import export_embeddings
    from dlfb_localization.runs import is_run_data, load_new_data, load_run

    if args.data is not None and not is_run_data(args.store, args.data):
        if args.split is not None:
            raise ValueError(
                f"--split chooses among the run's own splits, but {args.data} is "
                "not the run's data: every frame of it is embedded; drop --split"
            )
        run = load_run(args.store, progress=True)
        dataset = load_new_data(run, args.data, progress=True)
        name = Path(args.data).resolve().name
    else:
        run = load_run(args.store, progress=True, data=args.data)
        name = args.split or "test"
        dataset = run.splits[name]
    paths = export_embeddings(
        dataset, get_frame_embeddings(run.state, dataset), args.out, name=name
    )
    for path in paths.values():
        print(f"wrote {path}")


def figures(args: argparse.Namespace) -> None:
    from dlfb_localization.figures import write_model_figures
    from dlfb_localization.runs import load_run

    if len({store.name for store in args.store}) < len(args.store):
        raise ValueError("give each --store folder a different name")
    runs = {
        store.name: load_run(store, progress=True, data=args.data)
        for store in args.store
    }
    first_name, first = next(iter(runs.items()))
    shape = first.splits[args.split].image_shape
    for name, run in runs.items():
        if run.splits[args.split].image_shape != shape:
            raise ValueError(
                f"runs {first_name} and {name} were trained on frames of other "
                f"shapes ({shape} and {run.splits[args.split].image_shape}, "
                "height, width, channels); draw them with separate figures commands"
            )
    written = write_model_figures(
        {name: (run.state, run.metrics) for name, run in runs.items()},
        first.splits[args.split],
        args.out,
        rng=first.rng_frames,
    )
    for path in written.values():
        print(f"wrote {path}")


def predict(args: argparse.Namespace) -> None:
    from dlfb_localization.nucleus.config import PredictConfig
    from dlfb_localization.nucleus.run import run_prediction

    config = config_from_args(PredictConfig, args)
    result = run_prediction(config, args.out)
    print(
        f"held-out fields of view ({result['n_frames']} frames): "
        + ", ".join(
            f"{name} r={scores['correlation']:.3f} mse={scores['mse']:.4g}"
            for name, scores in result["overall"].items()
        )
    )
    print(f"wrote {args.out}/evaluation.json and {args.out}/predictions.png")


def crop(args: argparse.Namespace) -> None:
    from dlfb_localization.dataset.raw import CropSettings, RawLayout, crop_release

    layout = RawLayout(
        args.nucleus_file, args.protein_file, args.nucleus_channel, args.protein_channel
    )
    settings = CropSettings(args.pixel_size, args.target_pixel_size, args.crop_size)
    fields = crop_release(
        args.raw_dir,
        args.out,
        annotations=args.annotations,
        layout=layout,
        settings=settings,
        overwrite=args.overwrite,
        progress=True,
    )
    print(
        f"wrote {fields['n_crops'].sum()} crops of {fields['n_nuclei'].sum()} nuclei "
        f"in {len(fields)} fields into {args.out} (QC pictures in {args.out / 'qc'})"
    )
