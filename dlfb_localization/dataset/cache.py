"""The assembled cache: the chosen channels of every block in one memory map.

Built once (next to the raw files, or in a folder the caller names) and opened
read-only afterwards, so the release is never loaded into RAM. A cache is three
files sharing a stem that names its channels (and dtype, if not float32), e.g.
`images_c0.npy`, `labels_c0.csv` and `manifest_c0.json`, or `images_c0_f16.npy`
for a float16 cache, which halves the disk and page cache the release needs.
Each is written under a temporary name and renamed into place, the manifest
last: a cache without a manifest that matches the source files and the on-disk
sizes is stale or half-written, and is rebuilt. One process at a time builds a
cache (`locks.lock_folder` on its folder); another that finds it stale meanwhile
fails at once, naming the builder. Reading a finished cache takes no lock.
"""

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dlfb_localization.dataset.sources import (
    TABLE_COLUMNS,
    Block,
    DataFormatError,
    discover_blocks,
    fingerprint,
)
from dlfb_localization.files import replace_when_written, write_text
from dlfb_localization.locks import lock_folder

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
CACHE_DIRNAME = "dlfb_cache"
CACHE_DTYPES = {"float32": "", "float16": "_f16"}
# Frames copied per read: ~160 MB of float32 100x100x4, small next to a 6 GB block.
_CHUNK_FRAMES = 4096


def open_cache(
    data_path: str | os.PathLike,
    channels: Sequence[int] = (0,),
    *,
    cache_dir: str | os.PathLike | None = None,
    force_recreate: bool = False,
    trust_pickled_labels: bool = False,
    progress: bool = False,
    cache_dtype: str = "float32",
) -> tuple[np.ndarray, pd.DataFrame, str]:
    """Opens (building or rebuilding if needed) the cache of `data_path`.

    Args:
      data_path: folder with the release or sample format (see `sources`).
      channels: channel indices to keep, in order (the chapter keeps `(0,)`).
      cache_dir: where the cache lives; default `<data_path>/dlfb_cache`.
      force_recreate: rebuild even if a valid cache exists.
      trust_pickled_labels: see `sources.discover_blocks`.
      progress: show a progress bar while building.
      cache_dtype: "float32" or "float16". float16 halves the cache (the full
        release's protein channel: 21 instead of 42 GiB) at a relative rounding
        error below 5e-4; batches are float32 either way.

    Returns:
      `(frames, labels, digest)`: a read-only memmap of `cache_dtype`
      `[n_frames, h, w, len(channels)]`, the label table with a `frame_id` column
      (the row in `frames`), and a digest identifying this cache's content.

    Raises:
      locks.FolderLockedError: the cache needs building and another process is
        building it.
    """
    channels = tuple(int(c) for c in channels)
    if cache_dtype not in CACHE_DTYPES:
        raise ValueError(
            f"cache_dtype must be one of {sorted(CACHE_DTYPES)}, not {cache_dtype!r}"
        )
    blocks = discover_blocks(
        data_path, channels, trust_pickled_labels=trust_pickled_labels
    )
    folder = (
        Path(cache_dir) if cache_dir is not None else Path(data_path) / CACHE_DIRNAME
    )
    stem = "c" + "-".join(str(c) for c in channels) + CACHE_DTYPES[cache_dtype]
    paths = {
        "images": folder / f"images_{stem}.npy",
        "labels": folder / f"labels_{stem}.csv",
        "manifest": folder / f"manifest_{stem}.json",
    }
    expected = _manifest(blocks, channels, cache_dtype)
    reason = "force_recreate=True" if force_recreate else _stale_reason(paths, expected)
    if reason:
        logger.info("building cache %s (%s)", paths["images"], reason)
        _build(blocks, channels, paths, expected, progress, force_recreate)
    frames = np.load(paths["images"], mmap_mode="r")
    labels = pd.read_csv(paths["labels"], dtype=_LABEL_DTYPES, keep_default_na=False)
    digest = json.loads(paths["manifest"].read_text())["content_sha256"][:16]
    return frames, labels, digest


_LABEL_DTYPES = {
    "frame_id": np.int64,
    "ensg": str,
    "name": str,
    "loc_grade1": str,
    "loc_grade2": str,
    "loc_grade3": str,
    "protein_id": np.int64,
    "fov_id": np.int64,
}


def _manifest(blocks: Sequence[Block], channels: tuple[int, ...], dtype: str) -> dict:
    n_frames = sum(b.n_frames for b in blocks)
    h, w = blocks[0].frame_shape
    return {
        "version": CACHE_VERSION,
        "channels": list(channels),
        "shape": [n_frames, h, w, len(channels)],
        "dtype": dtype,
        "blocks": [{"name": b.name, "n_frames": b.n_frames} for b in blocks],
        "sources": fingerprint(blocks),
    }


def _stale_reason(paths: dict[str, Path], expected: dict) -> str | None:
    """Why the cache at `paths` cannot be used as it is, or None if it can."""
    if not paths["manifest"].exists():
        return "no cache yet"
    try:
        found = json.loads(paths["manifest"].read_text())
    except (OSError, json.JSONDecodeError):
        return "unreadable manifest"
    if found.get("payload") != expected:
        return "the source files or channels changed"
    if "content_sha256" not in found:
        return "the cache was written by an older version"
    for key in ("images", "labels"):
        path = paths[key]
        if not path.exists() or path.stat().st_size != found.get(f"{key}_bytes"):
            return f"{path.name} is missing or truncated"
    try:
        frames = np.load(paths["images"], mmap_mode="r")
    except (ValueError, OSError):
        return f"{paths['images'].name} is unreadable"
    if list(frames.shape) != expected["shape"] or frames.dtype != expected["dtype"]:
        return f"{paths['images'].name} has the wrong shape or dtype"
    return None


def _build(blocks, channels, paths, expected, progress, force: bool) -> None:
    """Writes the cache, holding its folder's lock (`locks.lock_folder`)."""
    folder = paths["images"].parent
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(lock_folder(folder))
        except OSError as error:
            raise PermissionError(
                f"cannot write the cache to {folder} ({error}); name a writable "
                "folder with --cache-dir (cache_dir= in Python); the data folder "
                "itself is never modified otherwise"
            ) from error
        if not force and _stale_reason(paths, expected) is None:
            return  # built by the writer that held the lock until a moment ago
        # The old manifest goes first, so a crash below leaves no valid-looking
        # cache.
        paths["manifest"].unlink(missing_ok=True)
        content = hashlib.sha256()
        with (
            replace_when_written(paths["images"]) as images,
            replace_when_written(paths["labels"]) as labels,
        ):
            _write_images(blocks, channels, images, expected, progress, content)
            _write_labels(blocks, labels)
            content.update(labels.read_bytes())
        manifest = {
            "payload": expected,
            # Identifies the data, not the files: the same frames and labels
            # written again (new mtimes) give the same digest, so checkpoints
            # trained on them are still recognised.
            "content_sha256": content.hexdigest(),
            "images_bytes": paths["images"].stat().st_size,
            "labels_bytes": paths["labels"].stat().st_size,
        }
        write_text(json.dumps(manifest, indent=1), paths["manifest"])


def _write_images(blocks, channels, path: Path, manifest: dict, progress, content):
    shape = manifest["shape"]
    out = np.lib.format.open_memmap(
        path, mode="w+", dtype=manifest["dtype"], shape=tuple(shape)
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=shape[0], unit="frame", desc="building cache")
    row = 0
    for block in blocks:
        for start in range(0, block.n_frames, _CHUNK_FRAMES):
            stop = min(start + _CHUNK_FRAMES, block.n_frames)
            # `read` has refused NaN, infinite and huge pixels (`sources`).
            chunk = np.asarray(block.read(start, stop, channels), dtype=np.float32)
            with np.errstate(over="ignore"):  # overflow is reported just below
                chunk = chunk.astype(out.dtype)
            _check_cast(chunk, block.name, start, channels)
            out[row : row + len(chunk)] = chunk
            content.update(np.ascontiguousarray(chunk).data)
            row += len(chunk)
            if bar is not None:
                bar.update(len(chunk))
    out.flush()
    del out
    if bar is not None:
        bar.close()


def _check_cast(chunk, block_name, start, channels) -> None:
    """Refuses pixels that overflowed when cast to the cache's dtype."""
    finite = np.isfinite(chunk).reshape(len(chunk), -1).all(axis=1)
    if finite.all():
        return
    bad = start + int(np.argmin(finite))
    raise DataFormatError(
        f"{block_name}: frame {bad} (row {bad} of that block) has pixels beyond "
        f"float16's range (+-65504) in channel(s) {list(channels)}; use "
        "--cache-dtype float32 (cache_dtype='float32')"
    )


def _write_labels(blocks, path: Path) -> None:
    tables = [block.read_labels() for block in blocks]
    table = pd.concat(tables, ignore_index=True)
    table.insert(0, "frame_id", np.arange(len(table), dtype=np.int64))
    names = table.groupby("protein_id")["name"].nunique()
    if (names > 1).any():
        protein = int(names.index[np.argmax(names.to_numpy() > 1)])
        raise DataFormatError(
            f"protein_id {protein} carries several gene names "
            f"{sorted(table.loc[table.protein_id == protein, 'name'].unique())}; "
            "each protein_id must name one protein"
        )
    table[["frame_id", *TABLE_COLUMNS]].to_csv(path, index=False)
