"""Files are written whole or not at all."""

import json
import math
import os
import stat
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from dlfb_localization.figures import save_figure
from dlfb_localization.files import replace_when_written, write_json


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "result.json"
    write_json({"accuracy": 0.5}, path)
    with pytest.raises(ValueError):
        write_json({"accuracy": math.nan}, path)  # NaN is not JSON
    assert json.loads(path.read_text()) == {"accuracy": 0.5}
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]


def test_a_write_that_fails_midway_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("old\n")
    with (
        pytest.raises(RuntimeError, match="disk full"),
        replace_when_written(path) as tmp,
    ):
        tmp.write_text("half a ta")
        raise RuntimeError("disk full")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["table.csv"]


def _plant(link: Path, target: Path) -> None:
    target.write_text("not yours")
    link.symlink_to(target)


def test_symlinks_at_the_old_temporary_names_are_not_written_through(tmp_path):
    # The names the writers used before: predictable, so a user sharing the
    # folder could plant a symlink there and have the writer overwrite its
    # target.
    out = tmp_path / "out"
    out.mkdir()
    planted = {
        out / f".result.json.tmp-{os.getpid()}": tmp_path / "a.txt",
        out / ".figure.tmp.png": tmp_path / "b.txt",
    }
    for link, target in planted.items():
        _plant(link, target)
    write_json({"accuracy": 0.5}, out / "result.json")
    save_figure(plt.figure(), out / "figure.png")
    for link, target in planted.items():
        assert target.read_text() == "not yours"
        assert link.is_symlink()
    assert json.loads((out / "result.json").read_text()) == {"accuracy": 0.5}
    assert not (out / "result.json").is_symlink()
    assert (out / "figure.png").read_bytes().startswith(b"\x89PNG")


def test_written_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    path = write_json([], tmp_path / "result.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
