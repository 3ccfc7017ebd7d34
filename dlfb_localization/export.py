"""Frame and protein embeddings, with their labels, in files any tool can read.

`export_embeddings` writes three files that need neither this library nor
pickle to load:

- `<name>.npz`: NumPy arrays only (numbers, and text as fixed-width unicode),
  so `np.load(path)` works with the default `allow_pickle=False`;
- `<name>_frames.csv`: one row per frame, in the order of the `frame_*` arrays;
- `<name>_proteins.csv`: one row per protein, in the order of the `protein_*`
  arrays.

For example, in a fresh Python session::

    import numpy as np, pandas as pd
    data = np.load("valid.npz")
    frames = pd.read_csv("valid_frames.csv")
    X = data["protein_histograms"]             # [n_proteins, K]
    y = data["protein_localizations"]          # [n_proteins] str

R reads the CSV files directly and the arrays with `reticulate` or `RcppCNPy`.

`<name>_frames.h5ad` and `<name>_proteins.h5ad` hold the same rows as AnnData
(scanpy's format): the codebook histogram as `X` (one variable per code) and in
`obsm["X_codebook_histogram"]`, the mean quantized vector in
`obsm["X_mean_quantized"]`, the label table as `obs` (a ViT's files: its
pooled embedding as `X` and in `obsm["X_attention_pooled"]`). `scanpy.pp.neighbors`,
`scanpy.tl.umap` and `scanpy.tl.leiden` run on them as they are (e.g.
`sc.pp.neighbors(adata, use_rep="X_codebook_histogram")`).

In the CSV files, a text cell that a spreadsheet would run as a formula (one
starting with `=`, `+`, `-`, `@`, a tab or a carriage return, e.g. a gene
named `=1+2`) is written with a leading `'`, as OWASP advises against CSV
injection; the `.npz` keeps the text as it is.
"""

import contextlib
import os
from pathlib import Path

import anndata
import numpy as np
import pandas as pd

from dlfb_localization.dataset import Dataset
from dlfb_localization.embeddings import (
    EMBEDDING_KINDS,
    aggregate_by_protein,
    label_tables,
)
from dlfb_localization.files import replace_when_written

__all__ = ["export_embeddings"]


def _text(values) -> np.ndarray:
    """Fixed-width unicode array (never an object array, which needs pickle)."""
    return np.asarray([str(v) for v in values], dtype=str).reshape(len(values))


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _spreadsheet_safe(table: pd.DataFrame) -> pd.DataFrame:
    """`table` with a `'` before every text cell a spreadsheet would evaluate."""
    safe = table.copy()
    for column in safe.columns:
        if not pd.api.types.is_numeric_dtype(safe[column]):
            safe[column] = [
                f"'{v}" if isinstance(v, str) and v.startswith(_FORMULA_STARTS) else v
                for v in safe[column]
            ]
    return safe


def export_embeddings(
    dataset_split: Dataset,
    frame_embeddings: dict[str, np.ndarray],
    out_dir: str | os.PathLike,
    name: str = "embeddings",
) -> dict[str, Path]:
    """Writes per-frame and per-protein embeddings with their label tables.

    Per-protein values are the means over the protein's frames (as
    `aggregate_proteins`). Files are written under temporary names and renamed
    into place only once all five are complete, so a crash never leaves a
    half-written file under the final name.

    Args:
      dataset_split: the split the frames belong to (for labels).
      frame_embeddings: `get_frame_embeddings(state, dataset_split)`.
      out_dir: folder to write to (created if needed).
      name: file name stem, e.g. "valid".

    Returns:
      `{"arrays": <name>.npz, "frames": <name>_frames.csv, "proteins":
      <name>_proteins.csv, "frames_h5ad": <name>_frames.h5ad, "proteins_h5ad":
      <name>_proteins.h5ad}` paths. The npz holds `frame_ids` [n] int64,
      `frame_protein_ids` [n] int64, `frame_histograms` [n, K] int32,
      `frame_vectors` [n, D] float32, `frame_localizations` [n] str (predominant
      localization, "" if unannotated), `protein_ids` [p] int64,
      `protein_names` [p] str, `protein_histograms` [p, K] float32,
      `protein_vectors` [p, D] float32, `protein_localizations` [p] str and
      `protein_n_frames` [p] int64: for a VQ-VAE; a ViT's embedding is
      `frame_pooled` / `protein_pooled` instead of the histograms and vectors.
    """
    frame_ids = np.asarray(frame_embeddings["frame_ids"], dtype=np.int64)
    # The finest level's embeddings the model has, in `EMBEDDING_KINDS`' order.
    features = {
        base: np.asarray(frame_embeddings[base])
        for base in EMBEDDING_KINDS
        if base in frame_embeddings
    }
    if not features:
        raise ValueError(
            f"frame_embeddings holds none of {list(EMBEDDING_KINDS)}: "
            f"{sorted(frame_embeddings)}"
        )
    if any(len(values) != len(frame_ids) for values in features.values()):
        raise ValueError(f"frame_ids and {', '.join(features)} must align")
    frames_table, proteins_table = label_tables(dataset_split, frame_ids)
    frame_proteins = frames_table["protein_id"].to_numpy(np.int64)
    protein_n_frames = proteins_table["n_frames"].to_numpy(np.int64)
    protein_features = {}
    for base, values in features.items():
        protein_ids, protein_features[base] = aggregate_by_protein(
            dataset_split, frame_ids, values
        )
    arrays = {
        "frame_ids": frame_ids,
        "frame_protein_ids": frame_proteins,
        **{
            base: values.astype(np.int32 if _is_histogram(base) else np.float32)
            for base, values in features.items()
        },
        "frame_localizations": _text(frames_table["predominant_localization"]),
        "protein_ids": protein_ids,
        "protein_names": _text(proteins_table["name"]),
        **{
            _protein_key(base): values.astype(np.float32)
            for base, values in protein_features.items()
        },
        "protein_localizations": _text(proteins_table["predominant_localization"]),
        "protein_n_frames": protein_n_frames.astype(np.int64),
    }

    annotated = {
        "frames_h5ad": _annotated(frames_table, "frame_id", features),
        "proteins_h5ad": _annotated(proteins_table, "protein_id", protein_features),
    }

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "arrays": out / f"{name}.npz",
        "frames": out / f"{name}_frames.csv",
        "proteins": out / f"{name}_proteins.csv",
        "frames_h5ad": out / f"{name}_frames.h5ad",
        "proteins_h5ad": out / f"{name}_proteins.h5ad",
    }
    with contextlib.ExitStack() as stack:
        tmp = {
            key: stack.enter_context(replace_when_written(p))
            for key, p in paths.items()
        }
        with open(tmp["arrays"], "wb") as f:
            np.savez_compressed(f, **arrays)
        _spreadsheet_safe(frames_table).to_csv(tmp["frames"], index=False)
        _spreadsheet_safe(proteins_table).to_csv(tmp["proteins"], index=False)
        for key in ("frames_h5ad", "proteins_h5ad"):
            annotated[key].write_h5ad(tmp[key])
    return paths


def _is_histogram(base: str) -> bool:
    return base == "frame_histograms"


def _protein_key(base: str) -> str:
    """`frame_histograms` -> `protein_histograms`, and so on."""
    return "protein_" + base.removeprefix("frame_")


def _annotated(
    table: pd.DataFrame, key: str, features: dict[str, np.ndarray]
) -> anndata.AnnData:
    """An AnnData of one row per frame or protein, the labels in `obs`: each
    embedding in `obsm["X_<its evaluation name>"]` (`X_codebook_histogram`,
    `X_mean_quantized`, `X_attention_pooled`), and the first of them as `X`
    (the codebook histogram, one variable per code, where the model has one)."""
    obs = table.set_index(table[key].astype(str).rename(None))
    obsm = {
        f"X_{EMBEDDING_KINDS[base][0]}": np.asarray(values, dtype=np.float32)
        for base, values in features.items()
    }
    first_base = next(iter(features))
    first = obsm[f"X_{EMBEDDING_KINDS[first_base][0]}"]
    prefix = "code" if _is_histogram(first_base) else "dim"
    return anndata.AnnData(
        X=first,
        obs=obs,
        var=pd.DataFrame(index=[f"{prefix}_{i}" for i in range(first.shape[1])]),
        obsm=obsm,
    )
