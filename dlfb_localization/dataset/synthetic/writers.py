"""The writers: the full release and cytoself's per-protein sample format.

`write_release` streams FOV by FOV into `Image_dataNN.npy` / `Label_dataNN.csv`
blocks; `write_sample_format` writes `<name>_pro/_nuc/_nucdist/_label.npy` protein
by protein. Every file is written under a temporary name and renamed when
complete (`files.replace_when_written`). The file names come from
`dataset.formats`, shared with the reader.
"""

import mmap
import os
import pathlib
import sys

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from dlfb_localization.dataset.formats import (
    IMAGE_BLOCK_RE,
    LABEL_BLOCK_RE,
    SAMPLE_LABEL_SUFFIX,
    SAMPLE_SUFFIXES,
    image_block_name,
    label_block_name,
)
from dlfb_localization.dataset.synthetic.render import _render_fov, generate_protein
from dlfb_localization.dataset.synthetic.spec import (
    SyntheticSpec,
    _label_rows,
    _plan,
)
from dlfb_localization.files import replace_when_written

_F32 = np.float32
# The default spec, one frozen instance shared by both writers' signatures.
_DEFAULT_SPEC = SyntheticSpec()
# File-backed pages of the output memmap count towards the process' resident memory;
# handing them back every this many bytes keeps a 32 GB release in a few hundred MB.
_RELEASE_EVERY_BYTES = 64 * 2**20


def write_release(
    out_dir: str | os.PathLike,
    spec: SyntheticSpec = _DEFAULT_SPEC,
    *,
    progress: bool = False,
) -> list[pathlib.Path]:
    """Writes a synthetic release: `Image_dataNN.npy` and `Label_dataNN.csv`.

    Images are float32 `[n_i, S, S, 4]` with channels (protein, nucleus, nuclear
    distance, nuclear segmentation). Protein and nucleus are scaled per FOV to
    [0, 1], the brightest ~0.2% (protein) or ~5% (Hoechst) of a FOV's pixels
    saturating at 1; the nuclear distance is the signed Euclidean distance in px
    to the nucleus boundary (positive inside); the segmentation is 0 or 1. Each
    CSV has one row per frame with header
    `ensg,name,loc_grade1,loc_grade2,loc_grade3,protein_id,FOV_id`; empty grades
    are empty cells. Frames are ordered by protein, then FOV; a protein may
    straddle two blocks.

    Only one FOV of pixels is in memory at a time (plus the pages of the output
    memmap, which are handed back as they are written). Every file is written
    under a temporary name and renamed when complete, so an interrupted run leaves
    no partial file (but, over an earlier release, a mix of new and old blocks).
    Blocks of an earlier, larger release in `out_dir` (higher numbers than this one
    writes) are removed at the end, since a release is read as blocks 00, 01, …
    together.

    Args:
      out_dir: folder to write into (created if missing).
      spec: what to generate.
      progress: show a progress bar over frames.

    Returns:
      The written paths: Image_data00.npy, Label_data00.csv, Image_data01.npy, …
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    proteins = _plan(spec)
    fovs = [(p, f) for p in proteins for f in range(spec.fovs_per_protein)]
    total = sum(sum(p.crops) for p in proteins)
    bounds = [total * b // spec.n_blocks for b in range(spec.n_blocks + 1)]
    labels = pd.concat([_label_rows(spec, p) for p in proteins], ignore_index=True)
    shape = (spec.image_size, spec.image_size, 4)

    written: list[pathlib.Path] = []
    fov_iter = iter(fovs)
    pending = np.empty((0, *shape), _F32)  # Crops of the current FOV not yet written.
    with tqdm(total=total, disable=not progress, unit="frame") as bar:
        for block in range(spec.n_blocks):
            start, stop = bounds[block], bounds[block + 1]
            image_path = out / image_block_name(block)
            label_path = out / label_block_name(block)
            with replace_when_written(image_path) as tmp:
                array = np.lib.format.open_memmap(
                    tmp, mode="w+", dtype=_F32, shape=(stop - start, *shape)
                )
                filled, released = 0, 0
                while filled < stop - start:
                    if not len(pending):
                        protein, fov_index = next(fov_iter)
                        pending = _render_fov(spec, protein, fov_index)
                    take = min(len(pending), stop - start - filled)
                    array[filled : filled + take] = pending[:take]
                    pending = pending[take:]
                    filled += take
                    bar.update(take)
                    released = _release_pages(array, filled, released)
                array.flush()
                del array
            _write_csv(labels.iloc[start:stop], label_path)
            written += [image_path, label_path]
    _remove_stale_blocks(out, spec.n_blocks)
    return written


def write_sample_format(
    out_dir: str | os.PathLike,
    spec: SyntheticSpec = _DEFAULT_SPEC,
) -> list[pathlib.Path]:
    """Writes cytoself's per-protein sample format, one protein at a time.

    For each protein: `<name>_pro.npy` and `<name>_nuc.npy` (`[n, S, S]` uint16,
    intensities x 65535, clipped to [0, 1] first), `<name>_nucdist.npy` (float32)
    and `<name>_label.npy`, an `[n, 3]` object array (ensg, name, main
    localization) saved with pickling, as cytoself ships it. The pixels are those
    of the release (`generate_protein`); the segmentation channel is not part of
    this format.

    Args:
      out_dir: folder to write into (created if missing).
      spec: what to generate (n_blocks is ignored).

    Returns:
      The written paths, four per protein in protein order.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for protein in _plan(spec):
        frames, _ = generate_protein(spec, protein.index)
        main = protein.grades[0].split(";")[0]
        label = np.empty((len(frames), 3), dtype=object)
        label[:, 0], label[:, 1], label[:, 2] = protein.ensg, protein.name, main
        arrays = (
            _as_uint16(frames[..., 0]),  # protein
            _as_uint16(frames[..., 1]),  # nucleus
            np.ascontiguousarray(frames[..., 2]),  # nuclear distance
            label,
        )
        suffixes = (*SAMPLE_SUFFIXES, SAMPLE_LABEL_SUFFIX)
        for suffix, array in zip(suffixes, arrays, strict=True):
            path = out / f"{protein.name}{suffix}"
            with replace_when_written(path) as tmp, open(tmp, "wb") as file:
                np.save(file, array, allow_pickle=array.dtype == object)
            written.append(path)
    return written


# Writing helpers -------------------------------------------------------------------


def _as_uint16(image: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(image, 0, 1) * 65535).astype(np.uint16)


def _write_csv(table: pd.DataFrame, path: pathlib.Path) -> None:
    with replace_when_written(path) as tmp:
        table.to_csv(tmp, index=False, lineterminator="\n")


def _release_pages(array: np.memmap, filled: int, released: int) -> int:
    """Drops written pages of `array` from this process' resident set (Linux).

    The pages stay in the page cache and reach the file as usual (MADV_DONTNEED on
    a shared file mapping discards no data); this only stops a multi-GB block from
    showing as resident memory. Returns the number of frames now released.
    """
    frame_bytes = array.itemsize * int(np.prod(array.shape[1:]))
    if (filled - released) * frame_bytes < _RELEASE_EVERY_BYTES:
        return released
    raw = getattr(array, "_mmap", None)
    if raw is None or not sys.platform.startswith("linux"):
        return filled
    # The mapping starts at a page boundary before the .npy header; release whole
    # pages up to the last complete one written.
    start_in_map = array.offset % mmap.ALLOCATIONGRANULARITY
    end = start_in_map + filled * frame_bytes
    end -= end % mmap.PAGESIZE
    if end > 0:
        raw.madvise(mmap.MADV_DONTNEED, 0, end)
    return filled


def _remove_stale_blocks(out: pathlib.Path, n_blocks: int) -> None:
    for path in out.iterdir():
        match = IMAGE_BLOCK_RE.match(path.name) or LABEL_BLOCK_RE.match(path.name)
        if match and int(match[1]) >= n_blocks:
            path.unlink()
