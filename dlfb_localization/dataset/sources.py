"""Reading the two OpenCell on-disk formats, block by block, without loading them.

1. The full release (cytoself's "Data Availability"): `Image_dataNN.npy`, float32
   `[n, 100, 100, 4]` with channels [protein, nucleus, nuclear distance, nuclear
   segmentation], and `Label_dataNN.csv`, one row per frame.
2. cytoself's per-protein sample format: `<name>_pro.npy`, `<name>_nuc.npy`,
   `<name>_nucdist.npy` (`[n, 100, 100]`, any numeric dtype) and `<name>_label.npy`
   (`[n, 3]`: Ensembl id, gene name, localization), the last a pickled object array.

Both become a list of `Block`s: a slice of frames whose pixels are read lazily from
memory-mapped files, and whose labels are a typed table. Every check here raises
`DataFormatError` naming the file and what to do about it. The formats' file names,
suffixes and label columns are defined in `formats`, shared with the writer.
"""

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dlfb_localization.dataset.formats import (
    IMAGE_BLOCK_RE,
    LABEL_BLOCK_RE,
    LABEL_COLUMNS,
    RELEASE_CHANNELS,
    SAMPLE_CHANNELS,
    SAMPLE_LABEL_SUFFIX,
    SAMPLE_SUFFIXES,
    image_block_name,
    label_block_name,
)
from dlfb_localization.dataset.localizations import GRADE_COLUMNS

# Larger pixel values are refused: a batch of 256 full 100x100 frames of them,
# squared and summed in the reconstruction loss, would come within a factor of
# 100 of float32's largest value (3.4e38). Microscopy intensities are below 1e5.
MAX_PIXEL_MAGNITUDE = 1e15

# The typed table every format is turned into (`FOV_id` renamed to the chapter's
# `fov_id`); `frame_id` is added when blocks are concatenated.
TABLE_COLUMNS = ("ensg", "name", *GRADE_COLUMNS, "protein_id", "fov_id")


class DataFormatError(ValueError):
    """The data on disk does not have the expected layout, shape, dtype or values."""


@dataclasses.dataclass(frozen=True)
class Block:
    """A run of consecutive frames from one set of source files.

    Attributes:
      name: what to call the block in messages (a file name).
      files: the source files, for detecting that a cache went stale.
      n_frames: number of frames.
      frame_shape: `(height, width)`.
      read: `read(start, stop, channels) -> [stop-start, h, w, len(channels)]`, any
        numeric dtype; reads only that slice from disk.
      read_labels: returns the block's label table (columns `TABLE_COLUMNS`).
    """

    name: str
    files: tuple[Path, ...]
    n_frames: int
    frame_shape: tuple[int, int]
    read: Callable[[int, int, Sequence[int]], np.ndarray]
    read_labels: Callable[[], pd.DataFrame]


def discover_blocks(
    data_path: str | os.PathLike,
    channels: Sequence[int],
    *,
    trust_pickled_labels: bool = False,
) -> list[Block]:
    """Finds and checks the blocks of the data set in `data_path`.

    Args:
      data_path: folder holding the full release or the per-protein sample format.
      channels: channel indices the caller will read (checked to exist).
      trust_pickled_labels: allow unpickling `<name>_label.npy` files (the sample
        format). Unpickling runs code from the file, so it is off by default.

    Returns:
      The blocks in frame order (release blocks 00, 01, …; sample proteins by name).

    Raises:
      DataFormatError: the folder is missing or empty, or a file is malformed.
    """
    path = Path(data_path)
    if path.exists() and not path.is_dir():
        raise DataFormatError(
            f"{path} is a file, not a folder; pass the folder holding "
            "Image_data00.npy / Label_data00.csv (or <name>_pro.npy … files)"
        )
    if not path.is_dir():
        raise DataFormatError(
            f"data folder {path} does not exist; pass the folder holding "
            "Image_data00.npy / Label_data00.csv (or <name>_pro.npy … files)"
        )
    names = sorted(p.name for p in path.iterdir())
    if any(IMAGE_BLOCK_RE.match(n) or LABEL_BLOCK_RE.match(n) for n in names):
        return _release_blocks(path, names, channels)
    if any(n.endswith((*SAMPLE_SUFFIXES, SAMPLE_LABEL_SUFFIX)) for n in names):
        return _sample_blocks(path, names, channels, trust_pickled_labels)
    raise DataFormatError(
        f"no OpenCell data in {path}: expected the full release (Image_data00.npy "
        "with Label_data00.csv, …) or cytoself's sample format (<name>_pro.npy, "
        "<name>_nuc.npy, <name>_nucdist.npy, <name>_label.npy)"
    )


def fingerprint(blocks: Sequence[Block]) -> list[dict]:
    """Name, size and modification time of every source file, to detect change."""
    entries = []
    for block in blocks:
        for file in block.files:
            stat = file.stat()
            entries.append(
                {"file": file.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            )
    return entries


# The full release ------------------------------------------------------------


def _release_blocks(
    path: Path, names: list[str], channels: Sequence[int]
) -> list[Block]:
    images = {int(m[1]): m[0] for n in names if (m := IMAGE_BLOCK_RE.match(n))}
    labels = {int(m[1]): m[0] for n in names if (m := LABEL_BLOCK_RE.match(n))}
    for number in sorted(set(images) - set(labels)):
        raise DataFormatError(
            f"{path / images[number]} has no label file: expected "
            f"{path / label_block_name(number)} beside it"
        )
    for number in sorted(set(labels) - set(images)):
        raise DataFormatError(
            f"{path / labels[number]} has no image file: expected "
            f"{path / image_block_name(number)} beside it"
        )
    numbers = sorted(images)
    for expected, number in enumerate(numbers):
        if number != expected:
            raise DataFormatError(
                f"block {expected:02d} is missing in {path}: found blocks "
                f"{', '.join(f'{n:02d}' for n in numbers)}; frame ids count rows "
                "across consecutive blocks 00, 01, …, so every block must be present"
            )

    blocks, frame_shape = [], None
    for number in numbers:
        image_file, label_file = path / images[number], path / labels[number]
        array = _open_npy(image_file)
        _check_numeric(array, image_file)
        if array.ndim != 4 or array.shape[-1] != len(RELEASE_CHANNELS):
            raise DataFormatError(
                f"{image_file} has shape {array.shape}; the release format is "
                f"[frames, height, width, {len(RELEASE_CHANNELS)}] with channels "
                f"{list(RELEASE_CHANNELS)}"
            )
        frame_shape = _check_frame_shape(array.shape[1:3], frame_shape, image_file)
        _check_channels(channels, len(RELEASE_CHANNELS), RELEASE_CHANNELS, image_file)
        read_labels = _csv_reader(label_file, array.shape[0], image_file)
        blocks.append(
            Block(
                name=image_file.name,
                files=(image_file, label_file),
                n_frames=array.shape[0],
                frame_shape=frame_shape,
                read=_release_reader(image_file, read_labels),
                read_labels=read_labels,
            )
        )
    return blocks


def _release_reader(file: Path, read_labels: Callable[[], pd.DataFrame]):
    def read(start: int, stop: int, channels: Sequence[int]) -> np.ndarray:
        frames = _open_npy(file)[start:stop][..., list(channels)]
        _check_pixels(frames, start, channels, lambda c: file, read_labels)
        return frames

    return read


def _csv_reader(file: Path, n_frames: int, image_file: Path):
    def read_labels() -> pd.DataFrame:
        try:
            table = pd.read_csv(file, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, UnicodeDecodeError) as error:
            raise DataFormatError(f"{file} is not a readable CSV: {error}") from error
        missing = [c for c in LABEL_COLUMNS if c not in table.columns]
        if missing:
            raise DataFormatError(
                f"{file} lacks the column(s) {missing}; its header must be "
                f"{','.join(LABEL_COLUMNS)}"
            )
        if len(table) != n_frames:
            raise DataFormatError(
                f"{file} has {len(table)} rows but {image_file} has {n_frames} frames; "
                "each label file needs exactly one row per frame of its image block"
            )
        table = table.rename(columns={"FOV_id": "fov_id"})
        for column in ("protein_id", "fov_id"):
            table[column] = _integer_column(table[column], column, file)
        for column in ("ensg", "name"):
            empty = np.flatnonzero(table[column].str.strip() == "")
            if empty.size:
                raise DataFormatError(
                    f"{file}: column '{column}' is empty in row {empty[0] + 1}; "
                    "every frame needs its protein's Ensembl id and gene name"
                )
        return table[list(TABLE_COLUMNS)]

    return read_labels


def _integer_column(values: pd.Series, column: str, file: Path) -> np.ndarray:
    numbers = pd.to_numeric(values, errors="coerce")
    bad = np.flatnonzero(numbers.isna().to_numpy() | (numbers % 1 != 0).to_numpy())
    if bad.size:
        raise DataFormatError(
            f"{file}: column '{column}' must hold integers, found "
            f"{values.iloc[bad[0]]!r} in row {bad[0] + 1}"
        )
    return numbers.to_numpy().astype(np.int64)


# cytoself's per-protein sample format ----------------------------------------------


def _sample_blocks(
    path: Path, names: list[str], channels: Sequence[int], trust_pickled_labels: bool
) -> list[Block]:
    stems = sorted(
        {
            n[: -len(s)]
            for n in names
            for s in (*SAMPLE_SUFFIXES, SAMPLE_LABEL_SUFFIX)
            if n.endswith(s)
        }
    )
    blocks, frame_shape = [], None
    for protein_id, stem in enumerate(stems):
        files = [path / f"{stem}{suffix}" for suffix in SAMPLE_SUFFIXES]
        label_file = path / f"{stem}{SAMPLE_LABEL_SUFFIX}"
        for file in [*files, label_file]:
            if not file.exists():
                needed = ", ".join(f.name for f in files)
                raise DataFormatError(
                    f"{file} is missing: the sample format needs {needed} and "
                    f"{label_file.name}"
                )
        _check_channels(channels, len(SAMPLE_CHANNELS), SAMPLE_CHANNELS, files[0])
        arrays = [_open_npy(f) for f in files]
        for array, file in zip(arrays, files, strict=True):
            _check_numeric(array, file)
            if array.ndim != 3 or array.shape != arrays[0].shape:
                raise DataFormatError(
                    f"{file} has shape {array.shape}; expected [frames, height, width] "
                    f"equal to {files[0].name}'s {arrays[0].shape}"
                )
        frame_shape = _check_frame_shape(arrays[0].shape[1:], frame_shape, files[0])
        labels = _load_sample_labels(label_file, trust_pickled_labels)
        if labels.shape != (arrays[0].shape[0], 3):
            raise DataFormatError(
                f"{label_file} has shape {labels.shape}; expected "
                f"[{arrays[0].shape[0]}, 3] (Ensembl id, gene name, localization), "
                f"one row per frame of {files[0].name}"
            )
        read_labels = _sample_table(labels, protein_id)
        blocks.append(
            Block(
                name=files[0].name,
                files=(*files, label_file),
                n_frames=arrays[0].shape[0],
                frame_shape=frame_shape,
                read=_sample_reader(files, read_labels),
                read_labels=read_labels,
            )
        )
    return blocks


def _load_sample_labels(file: Path, trust_pickled_labels: bool) -> np.ndarray:
    try:
        return np.load(file, allow_pickle=False)
    except ValueError as error:
        if "pickle" not in str(error):
            raise DataFormatError(
                f"{file} is not a readable .npy file: {error}"
            ) from error
        if not trust_pickled_labels:
            raise DataFormatError(
                f"{file} is a pickled object array, and unpickling a file runs code "
                "stored in it. If you trust where it came from, pass "
                "trust_pickled_labels=True"
            ) from error
        return np.load(file, allow_pickle=True)


def _sample_reader(files: list[Path], read_labels: Callable[[], pd.DataFrame]):
    def read(start: int, stop: int, channels: Sequence[int]) -> np.ndarray:
        frames = np.stack([_open_npy(files[c])[start:stop] for c in channels], -1)
        _check_pixels(frames, start, channels, files.__getitem__, read_labels)
        return frames

    return read


def _sample_table(labels: np.ndarray, protein_id: int):
    def read_labels() -> pd.DataFrame:
        n = labels.shape[0]
        table = pd.DataFrame(
            {
                "ensg": labels[:, 0].astype(str),
                "name": labels[:, 1].astype(str),
                "loc_grade1": labels[:, 2].astype(str),
                "loc_grade2": np.full(n, "", dtype=object),
                "loc_grade3": np.full(n, "", dtype=object),
                "protein_id": np.full(n, protein_id, dtype=np.int64),
                # The sample format records no field of view, so each protein counts
                # as one: splits exclusive by field of view are then exclusive by
                # protein, which can only make them stricter, never leak.
                "fov_id": np.full(n, protein_id, dtype=np.int64),
            }
        )
        return table[list(TABLE_COLUMNS)]

    return read_labels


# Shared checks ---------------------------------------------------------------


def _open_npy(file: Path) -> np.ndarray:
    try:
        return np.load(file, mmap_mode="r", allow_pickle=False)
    except ValueError as error:
        raise DataFormatError(
            f"{file} holds no numeric array (pickled or object data cannot be "
            f"memory-mapped): {error}"
        ) from error
    except (OSError, EOFError) as error:
        raise DataFormatError(f"{file} is not a readable .npy file: {error}") from error


def _check_numeric(array: np.ndarray, file: Path) -> None:
    if array.dtype.kind not in "fiu":
        raise DataFormatError(
            f"{file} has dtype {array.dtype}; images must be a real numeric dtype "
            "(the release ships float32)"
        )


def _check_pixels(
    frames: np.ndarray,
    start: int,
    channels: Sequence[int],
    file_of: Callable[[int], Path],
    read_labels: Callable[[], pd.DataFrame],
) -> None:
    """Refuses NaN, infinite and implausibly large pixels, naming the frame.

    Args:
      frames: `[n, h, w, len(channels)]`, frames `start` to `start + n` of a
        block, as read.
      start: the first frame's row in its file.
      channels: the channels read.
      file_of: the file holding a channel.
      read_labels: the block's label table (read only to name the protein).

    Raises:
      DataFormatError: naming the file, the frame's row, its protein and the
        channel.
    """
    # NaN compares False, so one comparison finds NaN, inf and huge values.
    good = np.abs(frames) <= MAX_PIXEL_MAGNITUDE
    if good.all():
        return
    row = int(np.argmin(good.reshape(len(frames), -1).all(axis=1)))
    column = int(np.argmin(good[row].reshape(-1, len(channels)).all(axis=0)))
    channel = channels[column]
    values = np.asarray(frames[row, ..., column], np.float64)
    try:
        protein = f", protein {read_labels()['name'].iloc[start + row]}"
    except DataFormatError:  # a broken label file is reported on its own
        protein = ""
    where = f"{file_of(channel)}: frame {start + row} (its row in that file{protein})"
    if not np.isfinite(values).all():
        raise DataFormatError(
            f"{where} has NaN or infinite pixels in channel {channel}; fix or drop "
            "the frame (and its label row) before building the data set"
        )
    raise DataFormatError(
        f"{where} has pixels of magnitude {np.abs(values).max():.3g} in channel "
        f"{channel}, above {MAX_PIXEL_MAGNITUDE:.0e}: squared and summed in the "
        "reconstruction loss they overflow float32; rescale the images"
    )


def _check_frame_shape(shape, expected, file: Path) -> tuple[int, int]:
    shape = tuple(int(s) for s in shape)
    if expected is not None and shape != expected:
        raise DataFormatError(
            f"{file} has frames of {shape[0]}x{shape[1]} pixels but earlier files have "
            f"{expected[0]}x{expected[1]}; all blocks must share one frame size"
        )
    return shape


def _check_channels(channels: Sequence[int], n: int, names: Sequence[str], file: Path):
    if not channels:
        raise DataFormatError("channels is empty: name at least one channel, e.g. (0,)")
    if len(set(channels)) < len(channels):
        raise DataFormatError(
            f"channels {list(channels)} name a channel twice; name each once"
        )
    bad = [c for c in channels if not 0 <= c < n]
    if bad:
        raise DataFormatError(
            f"channel(s) {bad} do not exist in {file.name}, which has {n}: "
            + ", ".join(f"{i}={name}" for i, name in enumerate(names))
        )
