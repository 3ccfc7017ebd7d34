"""The `dlfb-localization` command line. Kept short: the work is in the library."""

import argparse
import sys
from pathlib import Path


def _prepare(args: argparse.Namespace) -> None:
    from dlfb_localization.dataset.utils import get_dataset

    channels = tuple(int(c) for c in args.channels.split(","))
    dataset = get_dataset(
        args.data_dir,
        channels=channels,
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
        default="0",
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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError) as error:
        print(f"dlfb-localization {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
