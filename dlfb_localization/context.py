"""Where the library keeps data sets and trained models (the chapter's `assets`)."""

import os
import sys
from pathlib import Path

ENV_VAR = "DLFB_ASSETS_DIR"
COLAB_DIR = Path("/content/assets")
# A source checkout has `assets/` beside the package; an installed wheel does not.
_CHECKOUT_DIR = Path(__file__).resolve().parent.parent / "assets"
_HOME_DIR = Path.home() / ".dlfb_localization" / "assets"


def _on_colab() -> bool:
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def assets(subdir: str | None = None) -> str:
    """Returns the assets folder, or a folder inside it.

    The folder is, in order of precedence: the `DLFB_ASSETS_DIR` environment
    variable; `/content/assets` on Colab; the `assets/` folder of a source
    checkout; otherwise `~/.dlfb_localization/assets`. Nothing is created.

    Args:
      subdir: a path relative to the assets folder, e.g. "localization/datasets".

    Returns:
      The absolute path as a string (the chapter passes it to `str`-taking APIs).
    """
    if os.environ.get(ENV_VAR):
        root = Path(os.environ[ENV_VAR]).expanduser()
    elif _on_colab():
        root = COLAB_DIR
    elif _CHECKOUT_DIR.is_dir():
        root = _CHECKOUT_DIR
    else:
        root = _HOME_DIR
    path = root / subdir if subdir else root
    return str(path.resolve())
