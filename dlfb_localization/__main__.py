"""`python -m dlfb_localization` runs the command line."""

from dlfb_localization.cli import run

run()
