"""The chapter's `inspect.embeddings.utils`: embeddings of frames, proteins and
localizations. The code lives in `dlfb_localization.embeddings`, which has no
plotting, so that `evaluate` and `export` need not import `inspect`.
"""

from dlfb_localization import embeddings as _embeddings
from dlfb_localization.embeddings import *  # noqa: F403  (the chapter's import path)

__all__ = _embeddings.__all__
