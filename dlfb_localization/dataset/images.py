"""The image frames of a data set: a read-only memmap (or array) indexed by frame id."""

import hashlib

import numpy as np


class Images:
    """Frames `[n_frames, height, width, channels]`, indexed by frame id.

    float32, or float16 for a half-size cache; batches are float32 either way.

    Attributes:
      frames: the array; for the release, a read-only memmap of the cache.
      digest: identifies the content (the cache manifest's hash, or the array's).
    """

    def __init__(self, frames: np.ndarray, digest: str | None = None):
        if frames.ndim != 4:
            raise ValueError(
                f"frames must be [n_frames, height, width, channels], got shape "
                f"{frames.shape}; add a channel axis with images[..., None]"
            )
        if frames.dtype not in (np.float32, np.float16):
            raise ValueError(f"frames must be float32 or float16, got {frames.dtype}")
        self.frames = frames
        if digest is None:
            digest = hashlib.sha256(np.ascontiguousarray(frames).tobytes()).hexdigest()[
                :16
            ]
        self.digest = digest

    def __len__(self) -> int:
        return self.frames.shape[0]

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        """`(height, width, channels)` of one frame."""
        return tuple(int(s) for s in self.frames.shape[1:])
