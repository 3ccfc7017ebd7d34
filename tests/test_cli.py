"""The `dlfb-localization` command line."""

import pytest

from dlfb_localization.cli import main


def test_prepare_builds_the_cache(tiny_release, capsys):
    path, _, _ = tiny_release
    assert (
        main(["prepare", str(path), "--channels", "0,1", "--cache-dtype", "float16"])
        == 0
    )
    assert (path / "dlfb_cache" / "images_c0-1_f16.npy").exists()
    assert "72 frames, 6 proteins" in capsys.readouterr().out


def test_bad_path_is_a_clear_error_with_exit_2(tmp_path, capsys):
    assert main(["prepare", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_flag_value_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "x", "--cache-dtype", "int8"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'int8'" in capsys.readouterr().err
