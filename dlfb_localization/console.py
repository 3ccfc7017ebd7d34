"""What the command line prints beside its results: the library's log lines
and every warning, written through `tqdm.write` so that they never break a
progress bar."""

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

__all__ = ["console"]

PACKAGE_LOGGER = "dlfb_localization"


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    tqdm.write(f"warning: {category.__name__}: {message}", file=sys.stderr)


@contextlib.contextmanager
def console() -> Iterator[None]:
    """While the command line runs a command: the library's INFO lines (what it
    trains, restores or writes) print as plain lines, other libraries' log
    records at their own levels (e.g. Orbax's warnings), and Python warnings as
    one line `warning: Category: message`, all through `tqdm.write`, on
    stderr. Everything is put back on exit.
    """
    package = logging.getLogger(PACKAGE_LOGGER)
    saved = package.level, package.propagate, warnings.showwarning
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    package.propagate = False
    warnings.showwarning = _show_warning
    try:
        with logging_redirect_tqdm(loggers=[logging.root, package]):
            yield
    finally:
        package.removeHandler(handler)
        package.level, package.propagate, warnings.showwarning = saved
