"""Files are written whole or not at all."""

import json
import math

import pytest

from dlfb_localization.files import write_json


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "result.json"
    write_json({"accuracy": 0.5}, path)
    with pytest.raises(ValueError):
        write_json({"accuracy": math.nan}, path)  # NaN is not JSON
    assert json.loads(path.read_text()) == {"accuracy": 0.5}
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]
