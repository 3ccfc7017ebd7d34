"""What to generate, and the plan drawn from it before any pixel.

`SyntheticSpec` says how many proteins, fields of view and crops to draw and with
which seed; `SyntheticStyle` holds the imaging and biology knobs (`SECOND_STYLE` is
a second setting to check results against). `_plan` turns a spec into one
`_Protein` per class: its localization labels (a main pattern from `PATTERNS` and,
for some, plausible secondary ones), the relative intensity of each pattern, its
brightness and texture traits and the number of crops in each of its fields of
view. `_label_rows` gives a protein's rows of the release's label table.
"""

import dataclasses
import functools

import numpy as np
import pandas as pd

from dlfb_localization.dataset.formats import LABEL_COLUMNS
from dlfb_localization.dataset.localizations import LOCALIZATIONS_OF_INTEREST

# The nine localizations the chapter colours come first; the extras follow.
_EXTRA_PATTERNS = (
    "membrane",
    "centrosome",
    "nuclear_punctae",
    "cytoskeleton",
    "nucleolus_fc_dfc",
)
PATTERNS: tuple[str, ...] = LOCALIZATIONS_OF_INTEREST + _EXTRA_PATTERNS

# Plausible secondary localizations for each main one (what OpenCell annotates
# together), so multi-localized proteins look like real ones rather than random mixes.
_PARTNERS = {
    "mitochondria": ("cytoplasmic", "nucleoplasm"),
    "cytoplasmic": ("nucleoplasm", "membrane", "vesicles"),
    "er": ("nuclear_membrane", "cytoplasmic", "golgi"),
    "golgi": ("vesicles", "cytoplasmic", "er"),
    "vesicles": ("golgi", "cytoplasmic", "membrane"),
    "nucleoplasm": ("cytoplasmic", "nuclear_punctae", "nucleolus_gc", "chromatin"),
    "nuclear_membrane": ("er", "nucleoplasm"),
    "chromatin": ("nucleoplasm", "nucleolus_gc"),
    "nucleolus_gc": ("nucleoplasm", "nucleolus_fc_dfc"),
    "membrane": ("cytoplasmic", "vesicles"),
    "centrosome": ("cytoplasmic", "nucleoplasm"),
    "nuclear_punctae": ("nucleoplasm", "cytoplasmic"),
    "cytoskeleton": ("cytoplasmic", "centrosome"),
    "nucleolus_fc_dfc": ("nucleolus_gc", "nucleoplasm"),
}
# Relative intensity of a secondary localization by the grade it is annotated with.
_GRADE_WEIGHT = {1: (0.45, 0.75), 2: (0.25, 0.45), 3: (0.15, 0.3)}
# Thin or punctate patterns cover few pixels; over a diffuse main pattern they need
# a higher peak to be as visible as a diffuse secondary would be.
_SPARSE_GAIN = {
    "membrane": 2.0,
    "centrosome": 2.0,
    "nuclear_punctae": 2.0,
    "nucleolus_fc_dfc": 2.0,
    "nuclear_membrane": 1.6,
    "vesicles": 1.6,
    "golgi": 1.6,
    "cytoskeleton": 1.6,
}

# The default optics and camera of `SyntheticStyle`; the PSF's sigma is in pixels
# of a crop (~0.4 um/px) and also sets the gain of `fields._render_points`.
_PSF_SIGMA = 0.85
_READ_NOISE = 1.5  # Photon-equivalents per pixel.

# Stream tags of the SeedSequence, so the generators of the plan, of a protein and of
# a FOV can never coincide.
_PLAN_STREAM, _PROTEIN_STREAM, _FOV_STREAM = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class SyntheticStyle:
    """Imaging and biology knobs of the generator; the defaults are its own look.

    A second setting (`SECOND_STYLE`) checks that a result is not a property of
    one generator.

    Attributes:
      cell_scale: multiplies the cells' spacing and the nuclei's size.
      brightness: multiplies every protein's photon count (lower is noisier).
      psf_sigma: the optics' Gaussian blur, in pixels.
      read_noise: the camera's read noise, in photon-equivalents per pixel.
      texture_scale: multiplies the length scale of the proteins' patterns.
      expression_spread: multiplies the cell-to-cell spread of expression.
    """

    cell_scale: float = 1.0
    brightness: float = 1.0
    psf_sigma: float = _PSF_SIGMA
    read_noise: float = _READ_NOISE
    texture_scale: float = 1.0
    expression_spread: float = 1.0

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"SyntheticStyle.{field.name} must be a number")
            if not 0 < value < 100:
                raise ValueError(
                    f"SyntheticStyle.{field.name}={value} is outside (0, 100)"
                )


# Smaller, more crowded cells, dimmer and noisier proteins, more blur, coarser
# patterns and more cell-to-cell variation than the default look.
SECOND_STYLE = SyntheticStyle(
    cell_scale=0.82,
    brightness=0.35,
    psf_sigma=1.3,
    read_noise=3.0,
    texture_scale=1.35,
    expression_spread=1.6,
)


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """What to generate.

    Attributes:
      n_proteins: number of proteins (classes).
      fovs_per_protein: fields of view per protein.
      crops_per_fov: mean number of crops per FOV; each FOV draws its own count
        (1 + Poisson(crops_per_fov - 1)), decided before any pixel is drawn.
      n_blocks: number of `Image_dataNN.npy` / `Label_dataNN.csv` pairs; frames are
        split into contiguous blocks of nearly equal size.
      image_size: side of a square crop in pixels. The cells keep their physical
        size (nuclei ~35 px) whatever the crop size.
      secondary_fraction: share of proteins given secondary localizations.
      seed: non-negative integer; the same spec always writes the same bytes.
      style: the imaging and biology knobs (`SyntheticStyle`).
    """

    n_proteins: int = 30
    fovs_per_protein: int = 4
    crops_per_fov: int = 10
    n_blocks: int = 2
    image_size: int = 100
    secondary_fraction: float = 0.3
    seed: int = 0
    style: SyntheticStyle = SyntheticStyle()

    def __post_init__(self):
        for field, minimum in (
            ("n_proteins", 1),
            ("fovs_per_protein", 1),
            ("crops_per_fov", 1),
            ("n_blocks", 1),
            ("image_size", 16),
            ("seed", 0),
        ):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise TypeError(
                    f"SyntheticSpec.{field} must be an int, got {value!r} "
                    f"({type(value).__name__}); change {field}"
                )
            if value < minimum:
                raise ValueError(
                    f"SyntheticSpec.{field}={value} is too small; set {field} >= "
                    f"{minimum}"
                )
        if self.image_size > 512:
            raise ValueError(
                f"SyntheticSpec.image_size={self.image_size} is larger than this "
                "generator supports; set image_size <= 512 (OpenCell crops are 100)"
            )
        n_fovs = self.n_proteins * self.fovs_per_protein
        if self.n_blocks > n_fovs:
            raise ValueError(
                f"SyntheticSpec.n_blocks={self.n_blocks} exceeds the {n_fovs} fields "
                "of view (n_proteins * fovs_per_protein), so some blocks could be "
                "empty; lower n_blocks or raise n_proteins / fovs_per_protein"
            )
        fraction = self.secondary_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            raise TypeError(
                f"SyntheticSpec.secondary_fraction must be a number in [0, 1], got "
                f"{fraction!r}; change secondary_fraction"
            )
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(
                f"SyntheticSpec.secondary_fraction={fraction} is outside [0, 1]; "
                "set secondary_fraction to a share such as 0.3"
            )


# The plan: labels, traits and crop counts, decided before any pixel -----------------


@dataclasses.dataclass(frozen=True)
class _Protein:
    """Everything about one protein except its pixels."""

    index: int
    ensg: str
    name: str
    grades: tuple[str, str, str]  # loc_grade1..3 cells, ";"-joined.
    components: tuple[tuple[str, float], ...]  # (pattern, relative intensity).
    crops: tuple[int, ...]  # Crops in each of its FOVs.
    brightness: float  # Photons at the brightest structures of an average cell.
    expression_sigma: float  # Cell-to-cell log-normal spread of expression.
    texture: float  # Scales the length of texture correlations.
    puncta_density: float
    puncta_size: float
    diffuse: float  # Soluble pool, a fraction of the main pattern's intensity.
    diffuse_nuclear: float  # How much of the soluble pool enters the nucleus.
    style: tuple[float, float, float, float]  # Free per-pattern knobs in [0, 1).


@functools.lru_cache(maxsize=8)
def _plan(spec: SyntheticSpec) -> tuple[_Protein, ...]:
    """Labels, traits and crop counts of every protein of `spec`.

    Cheap (no pixels), and cached so that `generate_protein` can be called protein
    by protein.
    """
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, _PLAN_STREAM]))
    n = spec.n_proteins
    # ~75% on the chapter's nine, round-robin so all nine appear once n >= 9.
    n_chapter = min(n, max(9, round(0.75 * n)))
    mains = [LOCALIZATIONS_OF_INTEREST[i % 9] for i in range(n_chapter)]
    mains += [_EXTRA_PATTERNS[i % len(_EXTRA_PATTERNS)] for i in range(n - n_chapter)]
    # Shuffled, so protein order (and any split by protein) is not by localization.
    mains = [mains[i] for i in rng.permutation(n)]
    n_secondary = round(spec.secondary_fraction * n)
    has_secondary = np.zeros(n, bool)
    has_secondary[rng.permutation(n)[:n_secondary]] = True

    width = max(3, len(str(n - 1)))
    proteins = []
    for index in range(n):
        prng = np.random.default_rng(
            np.random.SeedSequence([spec.seed, _PROTEIN_STREAM, index])
        )
        crops = 1 + prng.poisson(spec.crops_per_fov - 1, spec.fovs_per_protein)
        main = mains[index]
        grades: list[list[str]] = [[main], [], []]
        components = [(main, 1.0)]
        if has_secondary[index]:
            partners = _PARTNERS[main]
            count = min(len(partners), int(prng.integers(1, 3)))
            for j in prng.choice(len(partners), count, replace=False):
                grade = int(prng.choice(3, p=[0.3, 0.45, 0.25])) + 1
                low, high = _GRADE_WEIGHT[grade]
                grades[grade - 1].append(partners[j])
                weight = prng.uniform(low, high) * _SPARSE_GAIN.get(partners[j], 1.0)
                components.append((partners[j], float(min(weight, 0.9))))
        proteins.append(
            _Protein(
                index=index,
                ensg=f"ENSG9{index:010d}",
                name=f"SYN{index:0{width}d}",
                grades=tuple(";".join(g) for g in grades),
                components=tuple(components),
                crops=tuple(int(c) for c in crops),
                # Log-normal: most proteins are well expressed, some dim and noisy.
                brightness=float(
                    np.clip(
                        120.0 * spec.style.brightness * np.exp(0.9 * prng.normal()),
                        8 * spec.style.brightness,
                        4000,
                    )
                ),
                expression_sigma=float(
                    prng.uniform(0.1, 0.4) * spec.style.expression_spread
                ),
                texture=float(prng.uniform(0.8, 1.3) * spec.style.texture_scale),
                puncta_density=float(np.exp(0.35 * prng.normal())),
                puncta_size=float(prng.uniform(0.8, 1.3)),
                diffuse=float(np.exp(prng.uniform(np.log(0.005), np.log(0.08)))),
                diffuse_nuclear=float(prng.uniform(0.2, 1.0)),
                style=tuple(float(x) for x in prng.random(4)),
            )
        )
    return tuple(proteins)


def _fov_id(spec: SyntheticSpec, protein_index: int, fov_index: int) -> int:
    return protein_index * spec.fovs_per_protein + fov_index


def _label_rows(spec: SyntheticSpec, protein: _Protein) -> pd.DataFrame:
    fov_ids = np.repeat(
        [_fov_id(spec, protein.index, f) for f in range(len(protein.crops))],
        protein.crops,
    )
    n = len(fov_ids)
    return pd.DataFrame(
        {
            "ensg": [protein.ensg] * n,
            "name": [protein.name] * n,
            "loc_grade1": [protein.grades[0]] * n,
            "loc_grade2": [protein.grades[1]] * n,
            "loc_grade3": [protein.grades[2]] * n,
            "protein_id": np.full(n, protein.index, np.int64),
            "FOV_id": fov_ids.astype(np.int64),
        },
        columns=list(LABEL_COLUMNS),
    )
