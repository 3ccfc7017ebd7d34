"""The assembled cache: built once, validated on open, rebuilt when stale."""

import json
import os

import numpy as np
import pytest

from dlfb_localization.cli import main
from dlfb_localization.dataset.builder import DatasetBuilder
from dlfb_localization.dataset.cache import open_cache
from dlfb_localization.dataset.utils import get_dataset
from dlfb_localization.locks import LOCK_FILE, FolderLockedError, lock_folder


def _cache_files(path):
    return sorted(p.name for p in (path / "dlfb_cache").iterdir())


def test_cache_is_built_once_and_reused(tiny_release):
    path, images, _ = tiny_release
    frames, labels, digest = open_cache(path)
    assert isinstance(frames, np.memmap) and not frames.flags.writeable
    np.testing.assert_array_equal(frames, images[..., :1])
    assert _cache_files(path) == ["images_c0.npy", "labels_c0.csv", "manifest_c0.json"]
    mtime = (path / "dlfb_cache" / "images_c0.npy").stat().st_mtime_ns
    _, _, digest_again = open_cache(path)
    assert (path / "dlfb_cache" / "images_c0.npy").stat().st_mtime_ns == mtime
    assert digest_again == digest
    np.testing.assert_array_equal(labels["frame_id"], np.arange(len(images)))


def test_digest_identifies_the_data_not_the_files(tiny_release):
    path, _, _ = tiny_release
    _, _, digest = open_cache(path)
    cache = path / "dlfb_cache" / "images_c0.npy"
    built = cache.stat().st_mtime_ns
    block = path / "Image_data00.npy"
    os.utime(block, ns=(built + 10**9, built + 10**9))  # the same data, rewritten
    _, _, digest_same = open_cache(path)
    assert cache.stat().st_mtime_ns != built  # rebuilt ...
    assert digest_same == digest  # ... to the same content
    images = np.load(block)
    images[0, 0, 0, 0] += 0.5
    np.save(block, images)
    _, _, digest_changed = open_cache(path)
    assert digest_changed != digest


def test_truncated_cache_is_rebuilt_not_read(tiny_release):
    path, images, _ = tiny_release
    open_cache(path)
    cache = path / "dlfb_cache" / "images_c0.npy"
    with open(cache, "r+b") as f:
        f.truncate(cache.stat().st_size // 2)
    frames, _, _ = open_cache(path)
    np.testing.assert_array_equal(frames, images[..., :1])


def test_half_written_cache_without_manifest_is_rebuilt(tiny_release):
    path, images, _ = tiny_release
    open_cache(path)
    cache = path / "dlfb_cache"
    (cache / "manifest_c0.json").unlink()  # as if the process died before the rename
    np.save(cache / "images_c0.npy", np.zeros((len(images), 16, 16, 1), np.float32))
    frames, _, _ = open_cache(path)
    np.testing.assert_array_equal(frames, images[..., :1])


def test_changed_source_block_makes_cache_stale(tiny_release):
    path, _, _ = tiny_release
    open_cache(path)
    block = np.load(path / "Image_data01.npy")
    block[..., 0] += 1.0
    np.save(path / "Image_data01.npy", block)
    # Same size: staleness must come from the modification time, not the size.
    os.utime(path / "Image_data01.npy", ns=(1, 10**18))
    frames, _, _ = open_cache(path)
    n0 = len(np.load(path / "Image_data00.npy", mmap_mode="r"))
    np.testing.assert_array_equal(frames[n0:, ..., 0], block[..., 0])


def test_force_recreate_and_separate_channel_caches(tiny_release):
    path, _, _ = tiny_release
    open_cache(path)
    manifest = json.loads((path / "dlfb_cache" / "manifest_c0.json").read_text())
    frames, _, _ = open_cache(path, channels=(0, 1))
    assert frames.shape[-1] == 2
    assert "manifest_c0-1.json" in _cache_files(path)
    assert (
        json.loads((path / "dlfb_cache" / "manifest_c0.json").read_text()) == manifest
    )
    DatasetBuilder(path, force_recreate=True)  # rebuilds without error


def test_cache_dir_keeps_data_folder_untouched(tiny_release, tmp_path):
    path, images, _ = tiny_release
    before = sorted(os.listdir(path))
    dataset = get_dataset(path, cache_dir=tmp_path / "cache")
    assert sorted(os.listdir(path)) == before
    assert len(dataset) == len(images)


def test_unwritable_cache_folder_says_to_pass_cache_dir(tiny_release, tmp_path):
    path, _, _ = tiny_release
    not_a_folder = tmp_path / "a_file"
    not_a_folder.write_text("")  # mkdir fails here even for root
    with pytest.raises(PermissionError, match="cache_dir"):
        open_cache(path, cache_dir=not_a_folder / "cache")


def test_float16_cache_is_half_the_size_and_batches_stay_float32(tiny_release):
    path, images, _ = tiny_release
    full = get_dataset(path)
    half = get_dataset(path, cache_dtype="float16")
    assert half.images.frames.dtype == np.float16
    cache = path / "dlfb_cache"
    data_bytes = images[..., :1].nbytes
    assert (cache / "images_c0.npy").stat().st_size >= data_bytes
    assert (cache / "images_c0_f16.npy").stat().st_size < data_bytes / 2 + 1024
    batch16 = next(half.get_batches(None, 72, shuffle=False, drop_remainder=False))
    batch32 = next(full.get_batches(None, 72, shuffle=False, drop_remainder=False))
    assert batch16["images"].dtype == np.float32
    np.testing.assert_allclose(batch16["images"], batch32["images"], rtol=1e-3)
    assert not np.array_equal(batch16["images"], batch32["images"])
    assert half.fingerprint != full.fingerprint


def test_float16_overflow_is_an_error_not_inf(tiny_release):
    path, images, _ = tiny_release
    block = images[:36].copy()
    block[2, 0, 0, 0] = 1e6
    np.save(path / "Image_data00.npy", block)
    with pytest.raises(ValueError, match=r"frame 2 .*beyond float16's range"):
        open_cache(path, cache_dtype="float16")
    with pytest.raises(ValueError, match="cache_dtype must be one of"):
        open_cache(path, cache_dtype="bfloat16")


def test_symlinks_at_the_old_temporary_names_are_not_written_through(
    tiny_release, tmp_path, capsys
):
    # The names the cache used before were predictable: a symlink planted
    # there in a shared data folder had `prepare` overwrite its target.
    path, images, _ = tiny_release
    cache = path / "dlfb_cache"
    cache.mkdir()
    targets = {}
    for name in ("images_c0.npy", "labels_c0.csv", "manifest_c0.json"):
        targets[name] = tmp_path / f"precious_{name}"
        targets[name].write_text("not yours")
        (cache / f"{name}.tmp").symlink_to(targets[name])
    assert main(["prepare", str(path)]) == 0
    for name, target in targets.items():
        assert target.read_text() == "not yours"
        assert (cache / f"{name}.tmp").is_symlink()
    frames, _, _ = open_cache(path)
    np.testing.assert_array_equal(frames, images[..., :1])


def test_a_cache_being_built_is_refused_and_a_built_one_read(tiny_release):
    path, images, _ = tiny_release
    cache = path / "dlfb_cache"
    with lock_folder(cache):
        with pytest.raises(FolderLockedError, match="dlfb_cache is being written"):
            open_cache(path)
        assert os.listdir(cache) == [LOCK_FILE]
    _, _, digest = open_cache(path)
    with lock_folder(cache):  # readers of a finished cache take no lock
        frames_again, _, digest_again = open_cache(path)
    np.testing.assert_array_equal(frames_again, images[..., :1])
    assert digest_again == digest
