"""Raw microscope fields of view to crops in the release format.

A biologist's own data: 16-bit TIFF/OME-TIFF fields, one folder per tagged
protein (`GENE_ENSG…/`, like OpenCell's raw download), a nucleus (Hoechst) and a
protein channel per field. `crop_release` segments the nuclei of every field,
cuts one 100x100 crop per nucleus at ~0.41 µm/px and writes
`Image_dataNN.npy` / `Label_dataNN.csv`, which `get_dataset` and
`DatasetBuilder` read like cytoself's release.

The modules, by job:
  fields    find and read fields (`RawLayout`: file name patterns, channels)
  segment   nucleus segmentation (`SegmentationConfig`, `segment_nuclei`)
  crops     resampling, crop placement, the release's channels, QC pictures
  release   `crop_field` for one field, `crop_release` for a raw folder
"""

from dlfb_localization.dataset.raw.fields import (
    Field,
    RawInputError,
    RawLayout,
    find_fields,
    read_field,
)
from dlfb_localization.dataset.raw.release import (
    OPENCELL_PIXEL_UM,
    CropSettings,
    FieldCrops,
    crop_field,
    crop_release,
)
from dlfb_localization.dataset.raw.segment import SegmentationConfig, segment_nuclei

__all__ = [
    "OPENCELL_PIXEL_UM",
    "CropSettings",
    "Field",
    "FieldCrops",
    "RawInputError",
    "RawLayout",
    "SegmentationConfig",
    "crop_field",
    "crop_release",
    "find_fields",
    "read_field",
    "segment_nuclei",
]
