"""The chapter's `inspect.embeddings.utils`: embeddings of frames, proteins and
localizations. The code lives in `dlfb_localization.embeddings`, which has no
plotting, so that `evaluate` and `export` need not import `inspect`.
"""

from dlfb_localization.embeddings import (
    aggregate_by_protein,
    aggregate_localizations,
    aggregate_proteins,
    cluster_feature_spectrums,
    correlate_codes,
    count_codes,
    frame_protein_ids,
    frame_rows,
    get_frame_embeddings,
    iterate_inference_batches,
    protein_localizations,
)

__all__ = [
    "aggregate_by_protein",
    "aggregate_localizations",
    "aggregate_proteins",
    "cluster_feature_spectrums",
    "correlate_codes",
    "count_codes",
    "frame_protein_ids",
    "frame_rows",
    "get_frame_embeddings",
    "iterate_inference_batches",
    "protein_localizations",
]
