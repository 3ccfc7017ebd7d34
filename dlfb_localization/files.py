"""Writing a file so that a crash never leaves a half-written one in its place."""

import contextlib
import json
import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["replace_when_written", "write_json", "write_text"]


@contextlib.contextmanager
def replace_when_written(path: str | os.PathLike) -> Iterator[Path]:
    """A new temporary file beside `path`, renamed onto it if the block succeeds.

    The block writes the temporary file by its name (with `open`,
    `np.lib.format.open_memmap`, `savefig`, `to_csv`, ...). The name is
    unpredictable (`.<name>.<random>.tmp`) and the file is created with
    `O_EXCL`, which never follows a symlink: nothing planted in the folder is
    written through. After the block the file is flushed to disk (fsync) and
    renamed onto `path`; if the block raises, it is removed and `path` keeps
    its old content. The folder is created if missing.

    The file gets the permissions `open` would give it (0o666 less the umask;
    `tempfile.mkstemp`'s 0o600 would hide a shared cache from the group).

    Args:
      path: the file to write.

    Yields:
      The temporary file's path, empty.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    replaced = False
    try:
        yield tmp
        os.fsync(fd)  # the file's data, whichever descriptor wrote it
        os.replace(tmp, path)
        replaced = True
    finally:
        os.close(fd)
        if not replaced:
            tmp.unlink(missing_ok=True)


def write_text(text: str, path: str | os.PathLike) -> Path:
    """Writes `text` to `path` through `replace_when_written`.

    The folder is created if missing. Returns the path.
    """
    path = Path(path)
    with replace_when_written(path) as tmp:
        tmp.write_text(text)
    logger.info("wrote %s", path)
    return path


def write_json(value: Any, path: str | os.PathLike) -> Path:
    """`write_text` of `value` as indented JSON; NaN or infinity is an error."""
    return write_text(json.dumps(value, indent=2, allow_nan=False) + "\n", path)
