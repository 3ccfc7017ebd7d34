"""`python -m dlfb_localization` runs the command line."""

import sys

from dlfb_localization.cli import main

sys.exit(main())
