"""The `dlfb-localization` command line. Kept short: the work is in the library.

A run lives in a folder (`--store`): `train` writes it, and `evaluate`, `embed`
and `figures` read it back (see `dlfb_localization.runs`).
"""

import argparse
import json
import sys
from pathlib import Path

from dlfb_localization.locks import FolderLockedError
from dlfb_localization.settings import add_flags, from_flags, parse_channels

SPLIT_CHOICES = ("train", "valid", "test")


def _prepare(args: argparse.Namespace) -> None:
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


def _demo(args: argparse.Namespace) -> None:
    from dlfb_localization import demo

    demo.run(args.out, seed=args.seed)


def _config_from_args(config_class, args: argparse.Namespace):
    """`config_class` (a dataclass with a `data` folder) from the parsed flags
    named like its fields."""
    if not args.data.is_dir():
        raise FileNotFoundError(f"--data {args.data} is not a folder")
    return from_flags(config_class, args)


def _train(args: argparse.Namespace) -> None:
    from dlfb_localization.runs import RunConfig, train_run

    config = _config_from_args(RunConfig, args)
    run = train_run(config, args.store)
    last = {name: values[-1]["mean"] for name, values in run.metrics["valid"].items()}
    print(
        f"trained {config.num_epochs} epochs into {args.store}: valid "
        + ", ".join(f"{k}={v:.4g}" for k, v in sorted(last.items()))
    )


def _evaluate(args: argparse.Namespace) -> None:
    from dlfb_localization.evaluate import evaluate
    from dlfb_localization.runs import load_run

    run = load_run(args.store, progress=True)
    out = args.out or args.store / f"evaluation_{args.split}.json"
    result = evaluate(run.state, run.splits[args.split], k=args.k, out_path=out)
    for level in ("protein", "frame"):
        scores = result["knn"][level]["all"]
        print(
            f"{level}-level {args.k}-NN accuracy: "
            + ", ".join(
                f"{name} {score['accuracy']:.3f}"
                for name, score in scores.items()
                if score is not None
            )
        )
    print(f"codebook: {json.dumps(result['codebook'])}")
    print(f"wrote {out}")


def _embed(args: argparse.Namespace) -> None:
    from dlfb_localization.embeddings import get_frame_embeddings
    from dlfb_localization.export import export_embeddings
    from dlfb_localization.runs import load_run

    run = load_run(args.store, progress=True)
    split = run.splits[args.split]
    paths = export_embeddings(
        split, get_frame_embeddings(run.state, split), args.out, name=args.split
    )
    for path in paths.values():
        print(f"wrote {path}")


def _figures(args: argparse.Namespace) -> None:
    from dlfb_localization.figures import write_model_figures
    from dlfb_localization.runs import load_run

    runs = {store.name: load_run(store, progress=True) for store in args.store}
    if len(runs) < len(args.store):
        raise ValueError("give each --store folder a different name")
    first = next(iter(runs.values()))
    written = write_model_figures(
        {name: (run.state, run.metrics) for name, run in runs.items()},
        first.splits[args.split],
        args.out,
        rng=first.rng_frames,
    )
    for path in written.values():
        print(f"wrote {path}")


def _predict(args: argparse.Namespace) -> None:
    from dlfb_localization.nucleus.config import PredictConfig
    from dlfb_localization.nucleus.run import run_prediction

    config = _config_from_args(PredictConfig, args)
    result = run_prediction(config, args.out)
    print(
        f"held-out fields of view ({result['n_frames']} frames): "
        + ", ".join(
            f"{name} r={scores['correlation']:.3f} mse={scores['mse']:.4g}"
            for name, scores in result["overall"].items()
        )
    )
    print(f"wrote {args.out}/evaluation.json and {args.out}/predictions.png")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dlfb-localization",
        description="Learn protein localization from OpenCell microscopy crops.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser(
        "prepare",
        help="check a data folder and build its cache",
        description="Checks an OpenCell data folder (the full release, "
        "Image_data00.npy + Label_data00.csv …, or cytoself's per-protein sample "
        "format) and builds the memory-mapped cache the training reads.",
    )
    prepare.add_argument("data_dir", type=Path, help="folder with the data")
    prepare.add_argument(
        "--channels",
        type=parse_channels,
        default=(0,),
        help="comma-separated channels to keep: 0=protein, 1=nucleus, "
        "2=nuclear distance, 3=nuclear segmentation (default: 0)",
    )
    prepare.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where to put the cache (default: DATA_DIR/dlfb_cache)",
    )
    prepare.add_argument(
        "--cache-dtype",
        choices=("float32", "float16"),
        default="float32",
        help="float16 halves the cache (42 -> 21 GiB for the release's protein "
        "channel); batches are float32 either way",
    )
    prepare.add_argument("--force", action="store_true", help="rebuild the cache")
    prepare.add_argument(
        "--trust-pickled-labels",
        action="store_true",
        help="allow reading the sample format's pickled <name>_label.npy files "
        "(unpickling runs code from the file: only for files you trust)",
    )
    prepare.set_defaults(func=_prepare)

    demo = commands.add_parser(
        "demo",
        help="run the main job on the embedded sample",
        description="Writes the embedded OpenCell-like sample, builds the "
        "chapter's splits and saves its figures into a run folder.",
    )
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder")
    demo.add_argument("--seed", type=int, default=42, help="seed (default: 42)")
    demo.set_defaults(func=_demo)

    _add_train(commands)

    def add_store(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--store", type=Path, required=True, help="a run folder written by train"
        )
        command.add_argument(
            "--split",
            choices=SPLIT_CHOICES,
            default="test",
            help="which of the run's splits (default: test)",
        )

    evaluate = commands.add_parser(
        "evaluate",
        help="localization k-NN, cluster scores and codebook health of a run",
        description="Scores a trained run on one split: k-NN accuracy and macro-F1 "
        "of the localization at frame and protein level for the codebook "
        "histograms, the mean quantized vectors and a raw-pixel PCA baseline; "
        "cluster scores on UMAPs; codebook health; reconstruction error. Writes "
        "JSON (default: STORE/evaluation_SPLIT.json) and prints a summary.",
    )
    add_store(evaluate)
    evaluate.add_argument("--k", type=int, default=5, help="neighbours (default: 5)")
    evaluate.add_argument("--out", type=Path, default=None, help="JSON file to write")
    evaluate.set_defaults(func=_evaluate)

    embed = commands.add_parser(
        "embed",
        help="export per-frame and per-protein embeddings with their labels",
        description="Writes SPLIT.npz (codebook histograms and mean quantized "
        "vectors of every frame and protein) and SPLIT_frames.csv / "
        "SPLIT_proteins.csv (labels) into --out; numpy and pandas, or R, read them.",
    )
    add_store(embed)
    embed.add_argument("--out", type=Path, required=True, help="folder to write into")
    embed.set_defaults(func=_embed)

    figures = commands.add_parser(
        "figures",
        help="the chapter's figures for one or several runs",
        description="Reconstructions, losses, perplexity, codebook usage, feature "
        "correlation and spectra for each run, and one UMAP of them all (aligned "
        "by frame when several --store are given, e.g. with and without the "
        "classification head). Runs must share their data.",
    )
    figures.add_argument(
        "--store",
        type=Path,
        action="append",
        required=True,
        help="a run folder; repeat for several",
    )
    figures.add_argument(
        "--split", choices=SPLIT_CHOICES, default="test", help="default: test"
    )
    figures.add_argument("--out", type=Path, required=True, help="folder for PNGs")
    figures.set_defaults(func=_figures)
    _add_predict(commands)
    return parser


def _add_train(commands) -> None:
    from dlfb_localization.runs import RunConfig

    train = commands.add_parser(
        "train",
        help="train the model on a data folder",
        description="Trains the chapter's model (VQ-VAE with a protein-id head), "
        "or cytoself's full model, on DATA's fov-exclusive 80/10/10 split, "
        "checkpointing every epoch into STORE. Run the same command again to "
        "resume an interrupted run; a STORE holding a run with other settings is "
        "refused.",
    )
    train.add_argument("--data", type=Path, required=True, help="data folder")
    train.add_argument("--store", type=Path, required=True, help="run folder")
    add_flags(train, RunConfig, skip=("data",))
    train.set_defaults(func=_train)


def _add_predict(commands) -> None:
    from dlfb_localization.nucleus.config import PredictConfig

    predict = commands.add_parser(
        "predict",
        help="predict the protein image from the nucleus and the protein's identity",
        description="Trains a conditional U-Net (and, with --gan, pix2pix) to "
        "predict channel 0 (protein) from channel 1 (nucleus) and the protein, on "
        "DATA's fov-exclusive 80/20 split; scores the pixel correlation and MSE "
        "on the unseen fields of view per localization, beside each protein's "
        "mean training image; writes OUT/evaluation.json, OUT/predictions.png and "
        "Orbax checkpoints (restored, not retrained, when run again).",
    )
    predict.add_argument("--data", type=Path, required=True, help="data folder")
    predict.add_argument("--out", type=Path, required=True, help="output folder")
    add_flags(predict, PredictConfig, skip=("data",))
    predict.set_defaults(func=_predict)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError, KeyError, FolderLockedError) as error:
        print(f"dlfb-localization {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
