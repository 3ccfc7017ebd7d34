"""The names of OpenCell's two on-disk formats, defined once for reader and writer.

The reader (`sources`) and the writer (`synthetic.writers`) both take file names,
suffixes and label columns from here, so what one writes the other finds.

1. The full release: blocks numbered 00, 01, …, each an image file
   `image_block_name(n)` (`Image_dataNN.npy`, float32 `[frames, h, w, 4]` with
   channels `RELEASE_CHANNELS`) and a label file `label_block_name(n)`
   (`Label_dataNN.csv`, header `LABEL_COLUMNS`, one row per frame).
   `IMAGE_BLOCK_RE` and `LABEL_BLOCK_RE` match these names and capture `NN`.
2. cytoself's per-protein sample format: for each protein `<name>`, one file
   `<name>` + suffix per channel of `SAMPLE_CHANNELS`, suffixes `SAMPLE_SUFFIXES`
   in the same order (`[frames, h, w]` each), and `<name>` + `SAMPLE_LABEL_SUFFIX`,
   an `[frames, 3]` object array (Ensembl id, gene name, localization).
"""

import re

from dlfb_localization.dataset.localizations import GRADE_COLUMNS

RELEASE_CHANNELS = ("protein", "nucleus", "nuclear_distance", "nuclear_segmentation")
SAMPLE_CHANNELS = ("protein", "nucleus", "nuclear_distance")
SAMPLE_SUFFIXES = ("_pro.npy", "_nuc.npy", "_nucdist.npy")  # One per sample channel.
SAMPLE_LABEL_SUFFIX = "_label.npy"
LABEL_COLUMNS = ("ensg", "name", *GRADE_COLUMNS, "protein_id", "FOV_id")

IMAGE_BLOCK_RE = re.compile(r"^Image_data(\d+)\.npy$")
LABEL_BLOCK_RE = re.compile(r"^Label_data(\d+)\.csv$")


def image_block_name(number: int) -> str:
    """The image file of release block `number`: `Image_dataNN.npy`."""
    return f"Image_data{number:02d}.npy"


def label_block_name(number: int) -> str:
    """The label file of release block `number`: `Label_dataNN.csv`."""
    return f"Label_data{number:02d}.csv"
