"""The label table of a data set split, and the integer arrays batches read."""

import numpy as np
import pandas as pd

from dlfb_localization.dataset import localizations as loc


class Labels:
    """Per-frame annotations of one split.

    `lookup` is a typed pandas table with one row per frame, sorted by `frame_id`,
    holding `frame_id`, `ensg`, `name`, `loc_grade1..3`, `protein_id`, `fov_id` and
    `code` (the consecutive class code of the protein). pandas is used to build and
    query it; batches read only the NumPy arrays `frame_ids` and `codes`.
    """

    def __init__(self, lookup: pd.DataFrame):
        missing = {"frame_id", "protein_id", "code"} - set(lookup.columns)
        if missing:
            raise ValueError(f"the label table lacks the column(s) {sorted(missing)}")
        self.lookup = lookup.sort_values("frame_id", kind="stable").reset_index(
            drop=True
        )
        self.frame_ids = self.lookup["frame_id"].to_numpy(np.int64)
        self.codes = self.lookup["code"].to_numpy(np.int32)

    def __len__(self) -> int:
        return len(self.lookup)

    def get_frame_ids(self) -> np.ndarray:
        """Frame ids of the split, ascending: `[n_frames]` int64."""
        return self.frame_ids

    def get_n_proteins(self) -> int:
        """Number of distinct proteins in the split."""
        return int(self.lookup["protein_id"].nunique())

    def frame_ids_of(self, gene_symbols) -> np.ndarray:
        """Frame ids of the named proteins; unknown names raise with examples."""
        known = set(self.lookup["name"])
        unknown = [g for g in gene_symbols if g not in known]
        if unknown:
            examples = ", ".join(sorted(known)[:8])
            raise ValueError(
                f"gene symbol(s) {unknown} are not in this data set; it has e.g. "
                f"{examples}"
            )
        return self.frame_ids[self.lookup["name"].isin(list(gene_symbols)).to_numpy()]

    def localizations(
        self, mode: str = "predominant", *, restrict: bool = True
    ) -> np.ndarray:
        """One localization per frame, "" where there is none to show.

        Args:
          mode: "predominant" (the protein's main localization) or "single" (only
            proteins annotated with exactly one localization).
          restrict: keep only the nine localizations the chapter colours.

        Returns:
          A string array `[n_frames]` aligned with `frame_ids`.
        """
        if mode == "predominant":
            values = loc.predominant_localization(self.lookup)
        elif mode == "single":
            values = loc.single_localization(self.lookup)
        else:
            raise ValueError(f"mode must be 'predominant' or 'single', not {mode!r}")
        return loc.restrict(values) if restrict else values
