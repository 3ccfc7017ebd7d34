"""`Dataset`: one split of frames with their labels, batches and a quick look."""

import hashlib
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd

from dlfb_localization.dataset.batches import iterate_batches, numpy_rng
from dlfb_localization.dataset.images import Images
from dlfb_localization.dataset.labels import Labels


class Dataset:
    """Frames of one split (train, valid, …) and their annotations.

    Args:
      images: all frames of the data set, indexed by frame id (shared by splits).
      labels: the split's label table; its `frame_id`s select rows of `images`.
    """

    def __init__(self, images: Images, labels: Labels):
        if len(labels) and labels.frame_ids.max() >= len(images):
            raise ValueError(
                f"labels refer to frame {labels.frame_ids.max()} but there are only "
                f"{len(images)} frames"
            )
        self.images = images
        self.labels = labels

    @classmethod
    def from_arrays(
        cls,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        names: Sequence[str] | None = None,
        localizations: Sequence[str] | None = None,
        fov_ids: np.ndarray | None = None,
    ) -> "Dataset":
        """A data set from in-memory arrays (your own crops, or tests).

        Args:
          images: `[n, h, w, c]` frames; converted to float32.
          labels: `[n]` protein ids (any integers); class codes are assigned in
            ascending order of id.
          names: optional `[n]` gene symbols (default "P<id>").
          localizations: optional `[n]` `loc_grade1` cells ("er", "er;golgi", "").
          fov_ids: optional `[n]` field-of-view ids (default: one per protein).
        """
        images = np.asarray(images, dtype=np.float32)
        labels = np.asarray(labels).astype(np.int64)
        n = len(images)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
        _, codes = np.unique(labels, return_inverse=True)
        lookup = pd.DataFrame(
            {
                "frame_id": np.arange(n, dtype=np.int64),
                "ensg": [f"ENSG{p:011d}" for p in labels],
                "name": list(names) if names is not None else [f"P{p}" for p in labels],
                "loc_grade1": list(localizations)
                if localizations is not None
                else [""] * n,
                "loc_grade2": [""] * n,
                "loc_grade3": [""] * n,
                "protein_id": labels,
                "fov_id": np.asarray(fov_ids) if fov_ids is not None else labels,
                "code": codes.astype(np.int32),
            }
        )
        return cls(Images(images), Labels(lookup))

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (
            f"Dataset({len(self)} frames, {self.labels.get_n_proteins()} proteins, "
            f"frames {self.image_shape})"
        )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """`(height, width, channels)` of one frame."""
        return self.images.frame_shape

    @property
    def fingerprint(self) -> str:
        """A hash of the split's frame ids, class codes, frame shape and image data."""
        digest = hashlib.sha256()
        digest.update(self.labels.frame_ids.tobytes())
        digest.update(self.labels.codes.tobytes())
        digest.update(repr(self.image_shape).encode())
        digest.update(self.images.digest.encode())
        return digest.hexdigest()[:16]

    def get_batches(
        self,
        rng,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_remainder: bool = True,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Yields batches `{"frame_ids": [b] int64, "images": [b,h,w,c] float32,
        "labels": [b] int32}`.

        The defaults are for training: a shuffled order that is a pure function of
        `rng` (a JAX key or an int), dropping the last partial batch. Inference
        passes `shuffle=False, drop_remainder=False` to get every frame once, in
        frame-id order (`rng` may then be None).
        """
        return iterate_batches(
            self.images.frames,
            self.labels.frame_ids,
            self.labels.codes,
            batch_size,
            rng,
            shuffle=shuffle,
            drop_remainder=drop_remainder,
        )

    def get_dummy_input(self) -> np.ndarray:
        """Zeros `[1, h, w, c]` float32 shaped like one frame, to initialise models."""
        return np.zeros((1, *self.image_shape), dtype=np.float32)

    def sample_frame_ids(self, n: int, rng, gene_symbols: Sequence[str] | None = None):
        """`n` distinct random frame ids (of `gene_symbols` if given), ascending."""
        pool = (
            self.labels.frame_ids
            if gene_symbols is None
            else self.labels.frame_ids_of(gene_symbols)
        )
        if n > len(pool):
            raise ValueError(f"asked for {n} frames but only {len(pool)} are available")
        return np.sort(numpy_rng(rng).choice(pool, size=n, replace=False))

    def plot_random_frames(
        self,
        n: int,
        rng,
        with_labels: bool = True,
        gene_symbols: Sequence[str] | None = None,
    ):
        """Plots `n` random frames (protein channel), titled with gene symbol and
        main localization (+k other localizations). Returns the Figure."""
        # The one arrow from the data layer up to plotting: the chapter calls
        # `dataset.plot_random_frames(...)` (SPEC.md, colab/01_data_tour), so
        # the method stays. Imported here, on call, so that importing `dataset`
        # never imports `inspect` or matplotlib; tests/test_layers.py allows
        # exactly this import. The drawing is `inspect.frames.plot_frames`.
        from dlfb_localization.inspect.frames import plot_frames

        frame_ids = self.sample_frame_ids(n, rng, gene_symbols)
        return plot_frames(self, frame_ids, with_labels=with_labels)
