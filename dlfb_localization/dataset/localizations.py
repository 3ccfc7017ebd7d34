"""Localization annotations: parsing the `loc_grade*` cells and summarising them.

OpenCell annotates each protein with up to three grades of localization; in the
release format grade 1 is the most prominent and each cell holds `;`-separated
names or nothing.
"""

import numpy as np
import pandas as pd

GRADE_COLUMNS = ("loc_grade1", "loc_grade2", "loc_grade3")

# The nine localizations the chapter colours in its projections and spectra.
LOCALIZATIONS_OF_INTEREST = (
    "mitochondria",
    "cytoplasmic",
    "er",
    "golgi",
    "vesicles",
    "nucleoplasm",
    "nuclear_membrane",
    "chromatin",
    "nucleolus_gc",
)


def split_localizations(cell: str) -> list[str]:
    """Splits one `loc_grade*` cell ("er;golgi" or "") into names."""
    return [name.strip() for name in str(cell).split(";") if name.strip()]


def frame_localizations(
    lookup: pd.DataFrame, columns: tuple[str, ...] = GRADE_COLUMNS
) -> list[list[str]]:
    """All localizations of each frame's protein, grade 1 first, without repeats.

    Args:
      lookup: the label table (`Labels.lookup`).
      columns: the grades to read, in order (e.g. `GRADE_COLUMNS[:2]` for
        grades 1 and 2 only).
    """
    grades = [lookup[column].to_numpy(str) for column in columns]
    result = []
    for cells in zip(*grades, strict=True):
        names: list[str] = []
        for cell in cells:
            names.extend(n for n in split_localizations(cell) if n not in names)
        result.append(names)
    return result


def predominant_localization(lookup: pd.DataFrame) -> np.ndarray:
    """The main localization of each frame: the first name of its highest grade.

    Returns:
      A string array `[n_frames]`; "" where the protein has no annotation.
    """
    return np.array(
        [names[0] if names else "" for names in frame_localizations(lookup)]
    )


def single_localization(lookup: pd.DataFrame) -> np.ndarray:
    """The localization of frames whose protein has exactly one, else "".

    Returns:
      A string array `[n_frames]`.
    """
    return np.array(
        [names[0] if len(names) == 1 else "" for names in frame_localizations(lookup)]
    )


def restrict(
    localizations: np.ndarray, allowed=LOCALIZATIONS_OF_INTEREST
) -> np.ndarray:
    """Blanks ("") every localization not in `allowed`."""
    localizations = np.asarray(localizations, dtype=object)
    keep = np.isin(localizations, list(allowed))
    return np.where(keep, localizations, "").astype(str)
