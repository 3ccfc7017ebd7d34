"""The `dlfb-localization` command line. Kept short: the work is in the library.

A run lives in a folder (`--store`): `train` writes it, and `evaluate`, `embed`
and `figures` read it back (see `dlfb_localization.runs`); `--data` points them
at a run's data where it has moved.

A failure ends with one line, `dlfb-localization: error: ...`, naming the file
or folder and what to do, and exit code 1 (2 for a wrong flag, as argparse
does; 130 when interrupted). `--debug`, or `DLFB_DEBUG=1` in the environment,
prints the traceback too.
"""

import argparse
import errno
import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path

from dlfb_localization import commands
from dlfb_localization.hugepages import restart_with_huge_pages
from dlfb_localization.locks import FolderLockedError
from dlfb_localization.settings import add_flags, parse_channels

SPLIT_CHOICES = ("train", "valid", "test")
PROG = "dlfb-localization"
DEBUG_ENV = "DLFB_DEBUG"


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(seed) for seed in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated seeds like 0,1,2, got {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Learn protein localization from OpenCell microscopy crops.",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"print the traceback of an error (or set {DEBUG_ENV}=1)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)

    prepare = subparsers.add_parser(
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
    prepare.set_defaults(func=commands.prepare)

    demo = subparsers.add_parser(
        "demo",
        help="run the main job on the embedded sample",
        description="Writes the embedded OpenCell-like sample, builds the "
        "chapter's splits and saves its figures into a run folder.",
    )
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder")
    demo.add_argument("--seed", type=int, default=42, help="seed (default: 42)")
    demo.set_defaults(func=commands.demo)

    _add_train(subparsers)

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
        add_data(command)

    def add_data(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--data",
            type=Path,
            default=None,
            help="the run's data folder, if it has moved since training "
            "(default: the one the run recorded)",
        )

    evaluate = subparsers.add_parser(
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
    evaluate.set_defaults(func=commands.evaluate)

    embed = subparsers.add_parser(
        "embed",
        help="export per-frame and per-protein embeddings with their labels",
        description="Writes SPLIT.npz (codebook histograms and mean quantized "
        "vectors of every frame and protein) and SPLIT_frames.csv / "
        "SPLIT_proteins.csv (labels) into --out; numpy and pandas, or R, read them. "
        "SPLIT_frames.h5ad / SPLIT_proteins.h5ad hold the same as AnnData, for "
        "scanpy. With --data NEW (a folder the run never saw, e.g. written by "
        "`crop`), the files are NEW.npz, ... and hold every frame of NEW.",
    )
    embed.add_argument(
        "--store", type=Path, required=True, help="a run folder written by train"
    )
    embed.add_argument(
        "--data",
        type=Path,
        default=None,
        help="a data folder to embed: every frame of it, named after the folder "
        "(NAME.npz, ...); its crops must have the run's size and channels. The "
        "run's own data (default) is read by --split; where it has moved, pass "
        "its new place here",
    )
    embed.add_argument(
        "--split",
        choices=SPLIT_CHOICES,
        default=None,
        help="which of the run's splits, with the run's own data (default: test)",
    )
    embed.add_argument("--out", type=Path, required=True, help="folder to write into")
    embed.set_defaults(func=commands.embed)

    figures = subparsers.add_parser(
        "figures",
        help="the chapter's figures for one or several runs",
        description="Reconstructions, losses, perplexity, codebook usage, feature "
        "correlation and spectra for each run, and one UMAP of them all (aligned "
        "by frame when several --store are given, e.g. with and without the "
        "classification head), as PNG files; and map.html, an interactive map of "
        "the first run's proteins to open in a browser (hover for a crop, click "
        "for nearest proteins). Runs must share their data.",
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
    figures.add_argument(
        "--out", type=Path, required=True, help="folder for the PNGs and map.html"
    )
    add_data(figures)
    figures.set_defaults(func=commands.figures)
    _add_compare(subparsers)
    _add_predict(subparsers)
    _add_crop(subparsers)
    return parser


def _add_compare(subparsers) -> None:
    from dlfb_localization.compare import DEFAULT_CANDIDATES

    compare = subparsers.add_parser(
        "compare",
        help="train several model families and score them on the same unseen proteins",
        description="Trains (or restores) each candidate on DATA for every seed, "
        "each for about --minutes of this machine's time, and scores its "
        "embeddings, beside raw pixels and an untrained model, on every frame of "
        "EVAL_DATA (proteins the runs never saw): protein-level k-NN and the "
        "multi-label probe. Writes OUT/compare.md, compare.json and compare.png "
        "(mean and standard deviation over the seeds) and the runs in OUT/runs.",
    )
    compare.add_argument("--data", type=Path, required=True, help="training data")
    compare.add_argument(
        "--eval-data",
        type=Path,
        required=True,
        help="data folder of unseen proteins, e.g. the demo's evaluation_data",
    )
    compare.add_argument("--out", type=Path, required=True, help="output folder")
    compare.add_argument(
        "--candidates",
        type=_names,
        default=DEFAULT_CANDIDATES,
        help="comma-separated (default: " + ",".join(DEFAULT_CANDIDATES) + ")",
    )
    compare.add_argument(
        "--seeds", type=_seeds, default=(0, 1, 2), help="default: 0,1,2"
    )
    compare.add_argument(
        "--minutes",
        type=float,
        default=2.0,
        help="training minutes per run on this machine (default: 2)",
    )
    compare.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="train every candidate this many epochs instead of --minutes",
    )
    compare.add_argument("--k", type=int, default=5, help="neighbours (default: 5)")
    compare.set_defaults(func=commands.compare)


def _add_train(subparsers) -> None:
    from dlfb_localization.runs import RunConfig

    train = subparsers.add_parser(
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
    train.set_defaults(func=commands.train)


def _add_predict(subparsers) -> None:
    from dlfb_localization.nucleus.config import PredictConfig

    predict = subparsers.add_parser(
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
    predict.set_defaults(func=commands.predict)


def _add_crop(subparsers) -> None:
    from dlfb_localization.dataset.raw import OPENCELL_PIXEL_UM, RawLayout

    default = RawLayout()
    crop = subparsers.add_parser(
        "crop",
        help="raw microscope fields of view to crops in the release format",
        description="Reads 16-bit TIFF/OME-TIFF fields from RAW_DIR (one folder "
        "per protein, GENE_ENSG…), segments the nuclei, cuts one 100x100 crop per "
        "nucleus and writes Image_dataNN.npy / Label_dataNN.csv (the release "
        "format that prepare and train read), fields.csv and a QC picture per "
        "field in OUT/qc. Nothing is left behind in OUT if a field is bad.",
    )
    crop.add_argument("raw_dir", type=Path, help="folder of protein folders")
    crop.add_argument("--out", type=Path, required=True, help="release folder")
    crop.add_argument(
        "--annotations",
        type=Path,
        default=None,
        help="CSV with ensg,name,loc_grade1[,loc_grade2,loc_grade3]",
    )
    crop.add_argument(
        "--pixel-size",
        type=float,
        default=OPENCELL_PIXEL_UM,
        help=f"µm per raw pixel (default: OpenCell's {OPENCELL_PIXEL_UM})",
    )
    crop.add_argument(
        "--target-pixel-size",
        type=float,
        default=2 * OPENCELL_PIXEL_UM,
        help=f"µm per crop pixel (default: {2 * OPENCELL_PIXEL_UM}, as cytoself's)",
    )
    crop.add_argument("--crop-size", type=int, default=100, help="default: 100")
    for what in ("nucleus", "protein"):
        crop.add_argument(
            f"--{what}-file",
            default=getattr(default, f"{what}_file"),
            help=f"file name pattern of the {what} channel, {{field}} standing for "
            f"the field's name (default: {getattr(default, f'{what}_file')!r}; the "
            "same pattern for both means one multi-channel stack per field)",
        )
        crop.add_argument(
            f"--{what}-channel",
            type=int,
            default=getattr(default, f"{what}_channel"),
            help=f"channel index of the {what} in a multi-channel file "
            f"(default: {getattr(default, f'{what}_channel')})",
        )
    crop.add_argument("--overwrite", action="store_true", help="replace OUT")
    crop.set_defaults(func=commands.crop)


def main(argv: list[str] | None = None) -> int:
    """Runs a command and returns its exit code, with errors reported in one
    line (see the module docstring); `run` is the console script."""
    from dlfb_localization.console import console

    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV) == "1"
    quiet = _NoTracebacks()
    if not debug:
        logging.getLogger("absl").addFilter(quiet)
    try:
        with console():
            args.func(args)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        exit_code, message = 130, f"{PROG}: interrupted"
    except Exception as error:
        if debug:
            traceback.print_exc()
        exit_code, message = 1, f"{PROG}: error: {_describe(error, debug)}"
    else:
        return 0
    finally:
        logging.getLogger("absl").removeFilter(quiet)
    # Printed last: once the failed command's frames are released (an
    # unfinished progress bar they hold closes first), and once background
    # threads (Orbax's writes of a failed save) have ended, rather than dying
    # with tracebacks as the interpreter shuts down.
    _join_threads(timeout=_THREADS_TIMEOUT_S)
    print(message, file=sys.stderr)
    return exit_code


_THREADS_TIMEOUT_S = 30.0


def _join_threads(timeout: float) -> None:
    """Waits, `timeout` seconds in all, for the other non-daemon threads."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))


class _NoTracebacks(logging.Filter):
    """Keeps a log record's message but drops its traceback. Orbax (through
    absl's logger) logs one per background thread when a save fails, e.g. on a
    full disk, before the error reaches `main`; `--debug` keeps them."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = record.exc_text = record.stack_info = None
        return True


# The library's errors (DataFormatError, ConfigMismatchError,
# DamagedCheckpointError, NonFiniteLossError) derive from these (and
# FolderLockedError names the folder's writer), and their
# messages name the file or folder and the fix.
_EXPECTED = (ValueError, OSError, ArithmeticError, FolderLockedError)


def _describe(error: Exception, debug: bool) -> str:
    """What to print for `error`: its message for expected errors, with a
    hint for a full disk; its type and first line for anything else."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return (
            f"{error}; the disk is full: free some space, or write to a folder on "
            "another disk, and run the command again"
        )
    if isinstance(error, _EXPECTED):
        return str(error)
    lines = str(error).strip().splitlines() or [""]
    hint = "" if debug else f"; run with --debug (or {DEBUG_ENV}=1) for the traceback"
    return f"unexpected {type(error).__name__}: {lines[0]}{hint}"


def run() -> None:
    """The `dlfb-localization` script and `python -m dlfb_localization`: `main`
    in a process whose malloc takes huge pages (`hugepages`), with its exit
    code."""
    restart_with_huge_pages()
    sys.exit(main())


if __name__ == "__main__":
    run()
