"""Raw fields of view to a release folder: segment, crop, label, write.

`crop_field` turns one field's nucleus and protein images into release frames;
`crop_release` does it for every field under a raw folder and writes
`Image_dataNN.npy` / `Label_dataNN.csv` blocks (names from `dataset.formats`),
a `fields.csv` that traces each `FOV_id` back to its files, and a QC picture per
field in `qc/`. Everything is written into a temporary folder beside the output
and renamed into place at the end, so a failure never leaves a half-written
release.
"""

import dataclasses
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from skimage import io
from tqdm.auto import tqdm

from dlfb_localization.dataset.formats import (
    LABEL_COLUMNS,
    image_block_name,
    label_block_name,
)
from dlfb_localization.dataset.localizations import GRADE_COLUMNS
from dlfb_localization.dataset.raw.crops import (
    cut_crops,
    qc_image,
    resample,
    select_nuclei,
)
from dlfb_localization.dataset.raw.fields import (
    Field,
    RawInputError,
    RawLayout,
    find_fields,
    read_field,
)
from dlfb_localization.dataset.raw.segment import SegmentationConfig, segment_nuclei

__all__ = ["CropSettings", "FieldCrops", "crop_field", "crop_release"]

logger = logging.getLogger(__name__)

# OpenCell's raw pixels; cytoself's crops are these downsampled 2x (see README).
OPENCELL_PIXEL_UM = 0.206


@dataclasses.dataclass(frozen=True)
class CropSettings:
    """How fields become crops.

    Attributes:
      pixel_size_um: pixel size of the raw fields.
      target_pixel_size_um: pixel size of the crops (OpenCell's 2x downsampling:
        a HEK293T nucleus is ~35 px across).
      crop_size: side of a crop in px at the target pixel size.
      segmentation: nucleus segmentation settings.
    """

    pixel_size_um: float = OPENCELL_PIXEL_UM
    target_pixel_size_um: float = 2 * OPENCELL_PIXEL_UM
    crop_size: int = 100
    segmentation: SegmentationConfig = dataclasses.field(
        default_factory=SegmentationConfig
    )

    def __post_init__(self):
        for name in ("pixel_size_um", "target_pixel_size_um", "crop_size"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


_DEFAULT_SETTINGS = CropSettings()
_DEFAULT_LAYOUT = RawLayout()


class FieldCrops(NamedTuple):
    """The crops of one field and what was found on the way.

    Attributes:
      frames: `[n, crop, crop, 4]` float32, the release's channels.
      labels: `[h, w]` int32 nucleus labels at the target pixel size.
      centres: `[n, 3]` int64 rows `(label, row, col)`, one per frame.
      qc: `[h, w, 3]` uint8, the field with nuclei and crop boxes drawn.
    """

    frames: np.ndarray
    labels: np.ndarray
    centres: np.ndarray
    qc: np.ndarray


def crop_field(
    nucleus: np.ndarray, protein: np.ndarray, settings: CropSettings = _DEFAULT_SETTINGS
) -> FieldCrops:
    """Segments one field's nuclei and cuts one crop per nucleus.

    Args:
      nucleus: `[h, w]` raw Hoechst intensities at `settings.pixel_size_um`.
      protein: `[h, w]` raw protein intensities, same size.
      settings: pixel sizes, crop size and segmentation settings.

    Returns:
      The frames, labels, crop centres and QC picture (`FieldCrops`); frames are
      in nucleus-label order, and there may be none.
    """
    source, target = settings.pixel_size_um, settings.target_pixel_size_um
    nucleus = resample(nucleus, source, target)
    protein = resample(protein, source, target)
    labels = segment_nuclei(nucleus, target, settings.segmentation)
    centres = select_nuclei(labels, settings.crop_size)
    frames = cut_crops(nucleus, protein, labels, centres, settings.crop_size)
    return FieldCrops(
        frames, labels, centres, qc_image(nucleus, labels, centres, settings.crop_size)
    )


def crop_release(
    raw_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    annotations: str | os.PathLike | None = None,
    layout: RawLayout = _DEFAULT_LAYOUT,
    settings: CropSettings = _DEFAULT_SETTINGS,
    frames_per_block: int = 100_000,
    overwrite: bool = False,
    progress: bool = False,
) -> pd.DataFrame:
    """Writes the release format from a folder of raw fields of view.

    Each protein folder becomes one `protein_id` (0, 1, … in folder order), each
    field one `FOV_id` (0, 1, … in order). Labels come from `annotations`, a CSV
    with the columns `ensg`, `name`, `loc_grade1` (and optionally `loc_grade2`,
    `loc_grade3`), like a release's own label file; a protein is looked up by
    Ensembl id, else by gene name. A protein the table lacks gets empty grades
    and a warning.

    Args:
      raw_dir: one subfolder per protein (`GENE_ENSG…`), holding its fields.
      out_dir: the release folder to write; it must not exist unless `overwrite`.
      annotations: the annotation table, or None for empty grades.
      layout: how fields and channels are named (`RawLayout`).
      settings: pixel sizes, crop size and segmentation (`CropSettings`).
      frames_per_block: a new `Image_dataNN.npy` starts once a block has this
        many frames (a field's frames stay in one block).
      overwrite: replace an existing `out_dir`.
      progress: show a progress bar over fields.

    Returns:
      The table written to `fields.csv`: one row per field with its `FOV_id`,
      protein, files, nuclei found and crops cut.

    Raises:
      RawInputError: bad input, named by file: an unreadable TIFF, not 16-bit, a
        missing channel, a field with no nuclei, a protein with no Ensembl id.
      FileExistsError: `out_dir` exists and `overwrite` is false.
    """
    raw_dir, out = Path(raw_dir), Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose a new folder or overwrite it")
    fields = find_fields(raw_dir, layout)
    table = _read_annotations(annotations) if annotations is not None else None
    proteins = {}  # folder -> (protein_id, label row)
    for field in fields:
        if field.protein not in proteins:
            proteins[field.protein] = (len(proteins), _label_of(field, table))

    # An unpredictable name, created new (nothing planted there is written into).
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(
        tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    )
    (tmp / "qc").mkdir()
    try:
        summary = _write_blocks(
            fields, proteins, layout, settings, tmp, frames_per_block, progress
        )
        summary.to_csv(tmp / "fields.csv", index=False, lineterminator="\n")
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        "wrote %d crops of %d fields into %s",
        summary["n_crops"].sum(),
        len(summary),
        out,
    )
    return summary


def _write_blocks(fields, proteins, layout, settings, tmp, frames_per_block, progress):
    rows, labels, writer, block = [], [], None, 0
    for fov_id, field in enumerate(tqdm(fields, disable=not progress, unit="field")):
        nucleus, protein = read_field(field, layout)
        crops = crop_field(nucleus, protein, settings)
        n_nuclei = int(crops.labels.max())
        if n_nuclei == 0:
            raise RawInputError(
                f"{field.nucleus_path}: no nuclei found; is this the nucleus "
                "(Hoechst) channel, and is --pixel-size right?"
            )
        name = f"{fov_id:05d}_{field.protein}_{field.field}.png"
        io.imsave(tmp / "qc" / name, crops.qc, check_contrast=False)
        if writer is None:
            writer = _NpyAppender(tmp / image_block_name(block), crops.frames.shape[1:])
        writer.append(crops.frames)
        protein_id, label = proteins[field.protein]
        labels += [{**label, "protein_id": protein_id, "FOV_id": fov_id}] * len(
            crops.frames
        )
        areas = np.bincount(crops.labels.ravel())[1:] * settings.target_pixel_size_um**2
        rows.append(
            {
                "FOV_id": fov_id,
                "protein": field.protein,
                "field": field.field,
                "nucleus_file": str(field.nucleus_path),
                "protein_file": str(field.protein_path),
                "n_nuclei": n_nuclei,
                "n_crops": len(crops.frames),
                "median_nucleus_area_um2": round(float(np.median(areas)), 1),
            }
        )
        if writer.n_frames >= frames_per_block:
            _close_block(writer, labels, tmp / label_block_name(block))
            writer, labels, block = None, [], block + 1
    if writer is not None:
        _close_block(writer, labels, tmp / label_block_name(block))
    summary = pd.DataFrame(rows)
    if summary["n_crops"].sum() == 0:
        raise RawInputError(
            f"no nucleus of any field lies a whole crop ({settings.crop_size} px) "
            "inside its field; are --pixel-size and --crop-size right?"
        )
    return summary


def _close_block(writer, labels, label_path):
    writer.close()
    table = pd.DataFrame(labels, columns=list(LABEL_COLUMNS))
    table.to_csv(label_path, index=False, lineterminator="\n")


class _NpyAppender:
    """Writes a float32 `.npy` whose first dimension grows as frames arrive.

    The header is written for zero frames and rewritten with the final count on
    `close`; NumPy pads headers so that the count can grow without moving data.
    """

    def __init__(self, path: Path, frame_shape: tuple[int, ...]):
        self.path, self.frame_shape, self.n_frames = path, tuple(frame_shape), 0
        self.file = open(path, "wb")  # noqa: SIM115 (closed in `close`)
        self.header_size = self._write_header()

    def _write_header(self) -> int:
        header = {
            "descr": np.lib.format.dtype_to_descr(np.dtype("<f4")),
            "fortran_order": False,
            "shape": (self.n_frames, *self.frame_shape),
        }
        np.lib.format.write_array_header_1_0(self.file, header)
        return self.file.tell()

    def append(self, frames: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(frames, dtype="<f4").tobytes())
        self.n_frames += len(frames)

    def close(self) -> None:
        self.file.seek(0)
        if self._write_header() != self.header_size:  # Never at realistic counts.
            raise RuntimeError(f"the .npy header of {self.path} changed size")
        self.file.close()


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


# Labels --------------------------------------------------------------------------


def _read_annotations(path: str | os.PathLike) -> pd.DataFrame:
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise RawInputError(
            f"annotation table {path} is not readable: {error}"
        ) from error
    missing = [c for c in ("ensg", "name", GRADE_COLUMNS[0]) if c not in table.columns]
    if missing:
        raise RawInputError(
            f"annotation table {path} lacks the column(s) {missing}; it needs ensg, "
            f"name and {', '.join(GRADE_COLUMNS)} (the last two may be left out)"
        )
    for column in GRADE_COLUMNS:
        if column not in table.columns:
            table[column] = ""
    table.attrs["path"] = path
    return table


def _label_of(field: Field, table: pd.DataFrame | None) -> dict:
    """The release's `ensg`, `name` and grade cells of the field's protein."""
    row = None
    if table is not None:
        found = table[table["ensg"] == field.ensg] if field.ensg else table.iloc[:0]
        if found.empty:
            found = table[table["name"] == field.name]
        if not found.empty:
            row = found.iloc[0]
        else:
            warnings.warn(
                f"{field.protein} is not in the annotation table "
                f"{table.attrs['path']}; its localization grades are left empty",
                stacklevel=4,
            )
    ensg = field.ensg or (row["ensg"] if row is not None else "")
    if not ensg:
        raise RawInputError(
            f"{field.nucleus_path.parent} has no Ensembl id: name the folder "
            "GENE_ENSG… or give the gene an ensg in the annotation table"
        )
    grades = {c: (row[c] if row is not None else "") for c in GRADE_COLUMNS}
    return {"ensg": ensg, "name": field.name, **grades}
