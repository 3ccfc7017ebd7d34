"""Finding and reading raw fields of view: 16-bit TIFF/OME-TIFF, one folder per protein.

The layout follows OpenCell's raw download: `RAW_DIR/<GENE>_<ENSG…>/` per tagged
protein, each folder holding that protein's fields of view. A field is either one
multi-channel stack (nucleus and protein channels picked by index) or two files,
one per channel, paired by a shared part of their names. `RawLayout` says which.
"""

import dataclasses
import re
from pathlib import Path

import numpy as np
import tifffile

from dlfb_localization.dataset.sources import DataFormatError

__all__ = ["Field", "RawInputError", "RawLayout", "find_fields", "read_field"]

_FOLDER_RE = re.compile(r"^(?P<name>.+?)_(?P<ensg>ENSG\d+)$")


class RawInputError(DataFormatError):
    """A raw field is unreadable, not 16-bit, lacks a channel, or has no nuclei."""


@dataclasses.dataclass(frozen=True)
class RawLayout:
    """How a protein folder names its fields and where each channel is.

    A pattern is a file name in which `{field}` stands for the part that differs
    between fields and `*` for any text; matching ignores case. When the two
    patterns are equal, each matching file is one field holding both channels
    (a stack, `[C, H, W]`, `[Z, C, H, W]`, …); otherwise the nucleus file and the
    protein file with the same `{field}` part form a field. A channel index picks
    a channel of a multi-channel file; a single-channel file is that channel.

    The defaults fit a folder of two-channel stacks, nucleus (Hoechst) first and
    protein (mNeonGreen) second, e.g. OpenCell-style `…_proj.tif` z-projections.
    For one file per channel set, e.g., `nucleus_file="{field}_405.tif"` and
    `protein_file="{field}_488.tif"`.

    Attributes:
      nucleus_file: pattern of the files holding the nucleus channel.
      protein_file: pattern of the files holding the protein channel.
      nucleus_channel: channel index of the nucleus in a multi-channel file.
      protein_channel: channel index of the protein in a multi-channel file.
    """

    nucleus_file: str = "{field}.tif"
    protein_file: str = "{field}.tif"
    nucleus_channel: int = 0
    protein_channel: int = 1

    def __post_init__(self):
        for name in ("nucleus_file", "protein_file"):
            if "{field}" not in getattr(self, name):
                raise ValueError(
                    f"{name}={getattr(self, name)!r} must contain '{{field}}', the "
                    "part of the file name that differs between fields"
                )
        for name in ("nucleus_channel", "protein_channel"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def is_stack(self) -> bool:
        """Both channels come from one file per field."""
        return self.nucleus_file == self.protein_file


@dataclasses.dataclass(frozen=True)
class Field:
    """One field of view of one protein, before reading.

    Attributes:
      protein: the protein folder's name (`GENE_ENSG…`).
      name: gene name, from the folder name.
      ensg: Ensembl id from the folder name, "" when the folder has none.
      field: the `{field}` part of the file name(s).
      nucleus_path: the file holding the nucleus channel.
      protein_path: the file holding the protein channel (may be `nucleus_path`).
    """

    protein: str
    name: str
    ensg: str
    field: str
    nucleus_path: Path
    protein_path: Path


def _pattern_re(pattern: str) -> re.Pattern:
    escaped = re.escape(pattern).replace(r"\{field\}", "(?P<field>.+?)")
    return re.compile("^" + escaped.replace(r"\*", ".*") + "$", re.IGNORECASE)


def find_fields(raw_dir: str | Path, layout: RawLayout = RawLayout()) -> list[Field]:
    """Every field of every protein folder in `raw_dir`, sorted by folder and field.

    Args:
      raw_dir: the folder holding one subfolder per protein (`GENE_ENSG…` or
        `GENE`; hidden folders are skipped).
      layout: file name patterns and channel indices.

    Returns:
      The fields, sorted by protein folder, then field name.

    Raises:
      RawInputError: `raw_dir` is missing, holds no protein folder, a field lacks
        its protein (or nucleus) file, or no field matches the patterns.
    """
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise RawInputError(f"raw folder {raw_dir} does not exist")
    folders = sorted(
        p for p in raw_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    if not folders:
        raise RawInputError(
            f"{raw_dir} holds no protein folder; put each protein's fields in a "
            "subfolder named GENE_ENSG… (like OpenCell's raw download)"
        )
    nucleus_re, protein_re = (
        _pattern_re(layout.nucleus_file),
        _pattern_re(layout.protein_file),
    )
    fields = []
    for folder in folders:
        match = _FOLDER_RE.match(folder.name)
        name, ensg = (match["name"], match["ensg"]) if match else (folder.name, "")
        files = sorted(p for p in folder.iterdir() if p.is_file())
        nuclei = {m["field"]: p for p in files if (m := nucleus_re.match(p.name))}
        proteins = {m["field"]: p for p in files if (m := protein_re.match(p.name))}
        if not layout.is_stack:
            # A name can match both patterns (e.g. "*.tif" and "{field}_488.tif");
            # a file is the protein's when it matches the protein pattern.
            nuclei = {k: p for k, p in nuclei.items() if p not in proteins.values()}
            for key in sorted(set(nuclei) ^ set(proteins)):
                has, lacks = (
                    ("nucleus", "protein") if key in nuclei else ("protein", "nucleus")
                )
                path = nuclei.get(key) or proteins[key]
                pattern = getattr(layout, f"{lacks}_file").replace("{field}", key)
                raise RawInputError(
                    f"{path} ({has} channel) has no {lacks} file: expected "
                    f"{folder / pattern}"
                )
        for key in sorted(nuclei):
            fields.append(
                Field(folder.name, name, ensg, key, nuclei[key], proteins[key])
            )
    if not fields:
        raise RawInputError(
            f"no file in the protein folders of {raw_dir} matches "
            f"{layout.nucleus_file!r}"
            + ("" if layout.is_stack else f" and {layout.protein_file!r}")
        )
    return fields


def read_field(
    field: Field, layout: RawLayout = RawLayout()
) -> tuple[np.ndarray, np.ndarray]:
    """Reads the nucleus and the protein image of one field.

    Args:
      field: from `find_fields`.
      layout: the channel indices.

    Returns:
      `(nucleus, protein)`, each `[h, w]` uint16; a z-stack is max-projected.

    Raises:
      RawInputError: a file is unreadable, not 16-bit, lacks the channel, or the
        two images differ in size; the message names the file.
    """
    # One multi-channel stack is read once; separate files may hold one channel.
    stack = _read_channels(field.nucleus_path) if layout.is_stack else None

    def read(path: Path, index: int, what: str) -> np.ndarray:
        channels = _read_channels(path) if stack is None else stack
        return _channel(channels, index, what, path, single_ok=stack is None)

    nucleus = read(field.nucleus_path, layout.nucleus_channel, "nucleus")
    protein = read(field.protein_path, layout.protein_channel, "protein")
    if nucleus.shape != protein.shape:
        raise RawInputError(
            f"{field.protein_path} is {protein.shape[1]}x{protein.shape[0]} px but "
            f"{field.nucleus_path} is {nucleus.shape[1]}x{nucleus.shape[0]}; the "
            "channels of a field must have the same size"
        )
    return nucleus, protein


def _read_channels(path: Path) -> np.ndarray:
    """The image in `path` as `[channels, h, w]` uint16 (z max-projected)."""
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            data, axes = series.asarray(), series.axes
    except Exception as error:  # tifffile raises many kinds on a broken file.
        raise RawInputError(f"{path} is not a readable TIFF: {error}") from error
    if data.dtype != np.uint16:
        raise RawInputError(
            f"{path} holds {data.dtype} pixels; raw fields must be 16-bit "
            "(uint16), straight from the microscope"
        )
    if axes[-2:] != "YX" and not (axes[-3:-1] == "YX" and axes[-1] == "S"):
        raise RawInputError(f"{path} has axes {axes!r}; expected the image last (…YX)")
    if axes.endswith("S"):  # Channels stored as RGB-like samples.
        data, axes = np.moveaxis(data, -1, 0), "S" + axes[:-1]
    if "Z" in axes:
        data, axes = data.max(axis=axes.index("Z")), axes.replace("Z", "")
    extra = [(a, n) for a, n in zip(axes[:-2], data.shape[:-2], strict=True) if n > 1]
    if len(extra) > 1:
        raise RawInputError(
            f"{path} has axes {axes!r} of shape {data.shape}; expected one channel "
            "axis at most (and optionally Z, which is max-projected)"
        )
    return data.reshape(-1, *data.shape[-2:])


def _channel(
    stack: np.ndarray, index: int, what: str, path: Path, *, single_ok: bool = False
) -> np.ndarray:
    if single_ok and len(stack) == 1:
        return stack[0]
    if index >= len(stack):
        raise RawInputError(
            f"{path} has {len(stack)} channel(s) but the {what} channel is set to "
            f"index {index}: the {what} channel is missing (set --{what}-channel, "
            "or give the channels as separate files with --nucleus-file/--protein-file)"
        )
    return stack[index]
