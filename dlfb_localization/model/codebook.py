"""Codebook improvements beyond the chapter, each behind its own switch.

The chapter learns its codebook by gradient descent on the codebook loss, from
a random initialisation. Three well-known remedies for codes that are never
chosen ("dead" codes, a low perplexity) are offered here, all off by default:

- EMA updates (van den Oord et al. 2017, appendix A.1; Razavi et al. 2019):
  each code becomes an exponential moving average of the encoder outputs
  assigned to it, instead of following the codebook loss's gradient.
- Dead-code restart (Dhariwal et al. 2020, "Jukebox"): a code whose moving
  average share of positions falls below a threshold is moved onto an encoder
  output of the current batch, drawn with probability proportional to its
  squared distance from its code, where it will be chosen.
- k-means initialisation (Łańcucki et al. 2020): the codebook starts at the
  k-means centroids of the untrained encoder's outputs on a few training frames,
  so every code starts where data is.

The first two need state carried between steps (moving averages); it lives in
the train state's `collections["codebook_stats"]`, beside the parameters (see
`model.interface.ModelState`), and is updated after each optimizer step by
`update_codebook` (through the model's `update_collections`). The codebook
itself stays a parameter, so inference reads it as always.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dlfb_localization.model.quantizer import l2_normalize

__all__ = [
    "LOOKUPS",
    "CodebookOptions",
    "init_codebook_state",
    "kmeans_codebook",
    "update_codebook",
]

# `CodebookOptions.lookup`: the default first.
LOOKUPS = ("cosine", "euclidean")
# Laplace smoothing of the EMA cluster sizes (Sonnet's VectorQuantizerEMA value).
_EMA_EPSILON = 1e-5
# Decay of each code's moving-average share of positions, which decides whether
# it is dead: ~1/(1 - 0.9) = 10 steps of memory, so a code is restarted within
# a few dozen steps of falling out of use (a demo epoch is ~40 steps).
_USAGE_DECAY = 0.9


@dataclasses.dataclass(frozen=True)
class CodebookOptions:
    """How codebooks are learned. The defaults are the chapter's, except the
    cosine lookup (`lookup="euclidean"` is the chapter's).

    Attributes:
      ema_decay: if set (e.g. 0.99), codes are moving averages of their
        assigned encoder outputs with this decay, and get no gradient (the
        codebook loss is still reported); None learns them by gradient descent.
      restart_dead_codes: move codes whose moving-average share of positions is
        below `dead_code_threshold / num_embeddings` onto encoder outputs of the
        batch that their codes describe worst, after every step.
      dead_code_threshold: see `restart_dead_codes`, in `(0, 1)`: 0.03 restarts a
        code used 33 times less than uniform use would.
      kmeans_init: start the codebook at k-means centroids of the untrained
        encoder's outputs (needs frames at initialisation).
      lookup: how encoder outputs are matched with codes. "cosine" (the
        default; Yu et al. 2021): both are scaled to unit length before the
        lookup, the losses and the straight-through output
        (`VectorQuantizer.normalize`), so the encoder's outputs cannot run away
        from the codebook. "euclidean": the chapter's nearest raw vector, whose
        codebook loss grows tenfold in a few epochs on standardized inputs.
    """

    ema_decay: float | None = None
    restart_dead_codes: bool = False
    dead_code_threshold: float = 0.03
    kmeans_init: bool = False
    lookup: str = "cosine"

    def __post_init__(self) -> None:
        if self.lookup not in LOOKUPS:
            raise ValueError(f"lookup must be one of {LOOKUPS}, got {self.lookup!r}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if not 0 < self.dead_code_threshold < 1:
            raise ValueError(
                f"dead_code_threshold must be in (0, 1), got {self.dead_code_threshold}"
            )

    def quantizer_fields(self) -> dict[str, bool]:
        """The `VectorQuantizer` fields these options set."""
        return {
            "learn_by_gradient": self.ema_decay is None,
            "normalize": self.lookup == "cosine",
        }

    @property
    def stateful(self) -> bool:
        """Whether training carries a `CodebookState` for each codebook."""
        return self.ema_decay is not None or self.restart_dead_codes


def init_codebook_state(codebook: jax.Array) -> dict[str, jax.Array]:
    """The moving averages of a fresh codebook `[D, K]`.

    Every code starts as if it had been chosen once at its current value
    (`count` 1, `sum` the code): an EMA codebook then leaves unused codes where
    they are instead of shrinking them towards zero, and the usage starts at
    uniform, so no code is dead before it had a chance.
    """
    num_embeddings = codebook.shape[1]
    return {
        "count": jnp.ones((num_embeddings,), jnp.float32),
        "sum": jnp.array(codebook, jnp.float32),  # a copy: params are donated
        "usage": jnp.full((num_embeddings,), 1 / num_embeddings, jnp.float32),
    }


def update_codebook(
    codebook: jax.Array,
    state: dict[str, jax.Array],
    latents: jax.Array,
    indices: jax.Array,
    options: CodebookOptions,
    rng: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One step of EMA updates and dead-code restarts (whichever are on).

    Args:
      codebook: `[D, K]` codes after the optimizer's update.
      state: `init_codebook_state`'s dict, from the previous step.
      latents: `[..., D]` encoder outputs of the step's batch (as quantized).
      indices: `[...]` the codes they chose.
      options: which updates to make.
      rng: key for picking restart targets.

    Returns:
      `(codebook, state)` after this step.
    """
    num_embeddings = codebook.shape[1]
    flat = latents.reshape(-1, codebook.shape[0]).astype(jnp.float32)
    flat = jax.lax.stop_gradient(flat)
    flat_indices = indices.reshape(-1)
    counts = jnp.bincount(flat_indices, length=num_embeddings).astype(jnp.float32)
    state = dict(state)
    if options.ema_decay is not None:
        decay = options.ema_decay
        sums = jax.ops.segment_sum(flat, flat_indices, num_embeddings).T
        state["count"] = decay * state["count"] + (1 - decay) * counts
        state["sum"] = decay * state["sum"] + (1 - decay) * sums
        total = jnp.sum(state["count"])
        smoothed = (
            (state["count"] + _EMA_EPSILON)
            / (total + num_embeddings * _EMA_EPSILON)
            * total
        )
        codebook = state["sum"] / smoothed[None, :]
    state["usage"] = _USAGE_DECAY * state["usage"] + (1 - _USAGE_DECAY) * (
        counts / flat_indices.size
    )
    if options.restart_dead_codes:
        dead = state["usage"] < options.dead_code_threshold / num_embeddings
        # Targets are drawn with probability proportional to their squared
        # distance from their code (as k-means++ seeds): a restarted code lands
        # where the codebook describes the data worst, e.g. in a cluster that
        # shares its code with another, rather than taking over a cluster that
        # already has a code of its own (which would only kill that code).
        # With the cosine lookup `latents` are unit vectors: compare unit codes.
        codes = (
            l2_normalize(codebook, axis=0) if options.lookup == "cosine" else codebook
        )
        errors = jnp.sum(jnp.square(flat - codes.T[flat_indices]), axis=1)
        picks = jax.random.categorical(
            rng, jnp.log(errors + 1e-12), shape=(num_embeddings,)
        )
        targets = flat[picks].T
        codebook = jnp.where(dead[None, :], targets, codebook)
        # A restarted code starts afresh: counted once at its new place, and at
        # uniform usage, so it is not restarted again before it is tried.
        state["count"] = jnp.where(dead, 1.0, state["count"])
        state["sum"] = jnp.where(dead[None, :], targets, state["sum"])
        state["usage"] = jnp.where(dead, 1 / num_embeddings, state["usage"])
    return codebook, state


def kmeans_codebook(
    vectors: np.ndarray, num_embeddings: int, seed: int = 0
) -> np.ndarray:
    """A `[D, K]` codebook of k-means centroids of `[n, D]` vectors.

    scikit-learn's k-means++ seeding and Lloyd iterations (one run, at most 25
    iterations: a starting point, not a converged clustering). With fewer
    distinct vectors than codes, the remaining codes are copies of random
    vectors with a little noise, so none is left far from the data.

    Raises:
      ValueError: no vectors, or non-finite ones.
    """
    vectors = np.asarray(vectors, np.float64).reshape(-1, vectors.shape[-1])
    if len(vectors) == 0 or not np.all(np.isfinite(vectors)):
        raise ValueError("k-means initialisation needs finite encoder outputs")
    rng = np.random.default_rng(seed)
    n_clusters = min(num_embeddings, len(np.unique(vectors, axis=0)))
    # Imported here: scikit-learn takes ~2 s to import, which every training
    # process paid, and only this initialisation uses it.
    from sklearn.cluster import KMeans

    kmeans = KMeans(n_clusters=n_clusters, n_init=1, max_iter=25, random_state=seed)
    centroids = kmeans.fit(vectors).cluster_centers_
    if n_clusters < num_embeddings:
        extra = vectors[rng.integers(len(vectors), size=num_embeddings - n_clusters)]
        scale = 0.01 * (vectors.std(axis=0) + 1e-6)
        extra = extra + rng.normal(size=extra.shape) * scale
        centroids = np.concatenate([centroids, extra])
    return centroids.T.astype(np.float32)
