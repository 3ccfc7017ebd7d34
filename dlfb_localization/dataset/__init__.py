"""The OpenCell data layer: formats, cache, splits and batches.

`from dlfb_localization.dataset import Dataset` is the chapter's import.
"""

from dlfb_localization.dataset.dataset import Dataset
from dlfb_localization.dataset.images import Images
from dlfb_localization.dataset.labels import Labels
from dlfb_localization.dataset.sources import DataFormatError

__all__ = ["DataFormatError", "Dataset", "Images", "Labels"]
