"""Writing a file so that a crash never leaves a half-written one in its place."""

import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["write_json", "write_text"]


def write_text(text: str, path: str | os.PathLike) -> Path:
    """Writes `text` to a temporary file beside `path`, then renames it into place.

    The folder is created if missing. Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("wrote %s", path)
    return path


def write_json(value: Any, path: str | os.PathLike) -> Path:
    """`write_text` of `value` as indented JSON; NaN or infinity is an error."""
    return write_text(json.dumps(value, indent=2, allow_nan=False) + "\n", path)
