"""The command line's console: log lines and warnings that keep the bar whole."""

import logging
import warnings

from tqdm.auto import tqdm

from dlfb_localization.console import console


def test_log_lines_and_warnings_print_as_lines_and_everything_is_put_back(capsys):
    logger = logging.getLogger("dlfb_localization.some_module")
    showwarning = warnings.showwarning
    with console(), tqdm(total=2, desc="work") as bar:
        logger.info("restored the run")
        warnings.warn("a codebook loss rising", UserWarning, stacklevel=1)
        logging.getLogger("orbax").warning("waiting for the previous save")
        logging.getLogger("orbax").info("not shown: below WARNING")
        bar.update(2)
    err = capsys.readouterr().err
    # Each message is a line of its own, not glued onto the bar's line.
    lines = err.replace("\r", "\n").splitlines()
    assert "restored the run" in lines
    assert "warning: UserWarning: a codebook loss rising" in lines
    assert "waiting for the previous save" in lines
    assert "not shown" not in err
    assert warnings.showwarning is showwarning
    logger.info("after the command")
    assert "after the command" not in capsys.readouterr().err
