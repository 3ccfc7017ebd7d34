"""What the VQ-VAE families share: input scaling, field checks, state
creation with the codebooks' moving averages, and their updates.

`VQFamily` is the mixin `LocalizationModel` and `CytoselfModel` inherit (plain
methods: the modules supply `standardize_inputs`, `codebook` and
`codebook_levels`); the functions below are what its methods call.
"""

import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dlfb_localization.model.codebook import (
    CodebookOptions,
    init_codebook_state,
    kmeans_codebook,
    update_codebook,
)
from dlfb_localization.model.interface import ModelState, new_train_state
from dlfb_localization.model.quantizer import VQOutput, count_codes

__all__ = [
    "CODEBOOK_STATS",
    "VQFamily",
    "check_common_fields",
    "create_model_state",
    "prepare_images",
    "restore_images",
    "summarise_level",
    "update_codebook_collections",
]


def _image_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-image, per-channel mean and standard deviation (floored at 1e-6)."""
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    std = jnp.std(x, axis=(1, 2), keepdims=True)
    return mean, jnp.maximum(std, 1e-6)


def prepare_images(x: jax.Array, standardize: bool) -> jax.Array:
    """`x`, standardized per image and channel if `standardize`."""
    if not standardize:
        return x
    mean, std = _image_moments(x)
    return (x - mean) / std


def restore_images(decoded: jax.Array, x: jax.Array, standardize: bool) -> jax.Array:
    """Maps a reconstruction of `prepare_images(x, standardize)` back to the
    scale of `x`."""
    if not standardize:
        return decoded
    mean, std = _image_moments(x)
    return decoded * std + mean


def check_common_fields(model: nn.Module) -> None:
    """Validates the fields `LocalizationModel` and `CytoselfModel` share."""
    if jnp.dtype(model.dtype) not in _COMPUTE_DTYPES:
        raise ValueError(
            f"dtype must be one of {[str(d) for d in _COMPUTE_DTYPES]}, "
            f"got {model.dtype}"
        )
    if model.num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {model.num_classes}")
    if model.embedding_dim < 2 or model.embedding_dim % 2:
        raise ValueError(
            "embedding_dim must be even and >= 2 (the encoder's first conv has "
            f"embedding_dim // 2 channels), got {model.embedding_dim}"
        )
    if model.num_embeddings < 1:
        raise ValueError(f"num_embeddings must be >= 1, got {model.num_embeddings}")
    if model.commitment_cost < 0:
        raise ValueError(f"commitment_cost must be >= 0, got {model.commitment_cost}")
    if not 0 <= model.dropout_rate < 1:
        raise ValueError(f"dropout_rate must be in [0, 1), got {model.dropout_rate}")
    if model.classification_head_layers < 1:
        raise ValueError(
            "classification_head_layers must be >= 1, got "
            f"{model.classification_head_layers}"
        )
    if not isinstance(model.codebook, CodebookOptions):
        raise TypeError(
            f"codebook must be a CodebookOptions, got {type(model.codebook).__name__}"
        )


@functools.partial(jax.jit, static_argnums=0)
def _codebook_latents(model: nn.Module, params, images: jax.Array):
    return model.apply({"params": params}, images, method="codebook_latents")


@functools.partial(jax.jit, static_argnums=0)
def _init_params(model: nn.Module, rng: jax.Array, dummy_input: jax.Array):
    # One compiled program instead of one per op, cached per (model, input shape):
    # modules are hashable dataclasses. Op by op, initialization compiled a
    # random-number kernel per parameter shape, which took seconds on CPU.
    return model.init(rng, dummy_input, is_training=False)["params"]


# float16 would need loss scaling; bfloat16 has float32's exponent range.
_COMPUTE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


class VQFamily:
    """What the VQ-VAE families (`LocalizationModel`, `CytoselfModel`) share
    beyond their layers: input scaling, state creation and the codebooks'
    non-gradient updates (see `model.interface`). A mixin of plain methods;
    the module supplies `standardize_inputs`, `codebook` and `codebook_levels`.
    """

    # Every loss is a mean over frames: a batch may be split into passes.
    independent_samples: ClassVar[bool] = True

    def prepare_inputs(self, x: jax.Array) -> jax.Array:
        """The images as the encoder sees them and the decoder reconstructs them."""
        return prepare_images(x, self.standardize_inputs)

    def restore_scale(self, decoded: jax.Array, x: jax.Array) -> jax.Array:
        """Maps a reconstruction of `prepare_inputs(x)` back to the scale of `x`."""
        return restore_images(decoded, x, self.standardize_inputs)

    @nn.nowrap
    def create_train_state(
        self,
        rng: jax.Array,
        dummy_input: jax.Array,
        tx: optax.GradientTransformation,
        init_images: jax.Array | None = None,
    ) -> ModelState:
        """Initializes parameters and the optimizer state.

        Args:
          rng: JAX key. It is split as in the book (the second of three keys
            initializes the weights), so a key gives the book's initial weights.
          dummy_input: `[1, H, W, C]` array shaped like the data, e.g.
            `dataset.get_dummy_input()`.
          tx: the optimizer, e.g. `optax.adam(1e-3)`. Build it once per run: a
            new optax object is a new static field and recompiles the steps.
          init_images: `[n, H, W, C]` training frames, needed (only) with
            `codebook.kmeans_init`.

        Returns:
          A `ModelState` (a `TrainState`) with `apply_fn=self.apply`, step 0;
          its `collections` hold the codebook's moving averages when it keeps
          any.
        """
        return create_model_state(self, rng, dummy_input, tx, init_images)

    @nn.nowrap
    def update_collections(self, params, collections, codes, rng):
        """EMA updates and dead-code restarts after an optimizer step
        (`update_codebook_collections`)."""
        return update_codebook_collections(self, params, collections, codes, rng)


def summarise_level(vq: VQOutput, num_embeddings: int) -> dict[str, jax.Array]:
    """Code-use histograms `[b, K]` and mean quantized vectors `[b, D]` of one
    quantizer's output (split sub-vectors count as positions)."""
    batch = vq.indices.shape[0]
    codes = vq.quantized.reshape(batch, vq.indices[0].size, -1)
    return {
        "frame_histograms": count_codes(vq.indices, num_embeddings),
        "frame_vectors": jnp.mean(codes, axis=1).astype(jnp.float32),
    }


# Keys of dead-code restarts: `fold_in(step key, _CODEBOOK_STREAM + i)` for
# the i-th codebook in sorted order, a stream apart from dropout's and the
# augmentation's.
_CODEBOOK_STREAM = 2_000_003
# The collection holding each codebook's moving averages.
CODEBOOK_STATS = "codebook_stats"


def update_codebook_collections(
    model: nn.Module, params, collections, codes: dict[str, Any], rng: jax.Array
):
    """EMA updates and dead-code restarts of every codebook of `model` after
    the optimizer's update (`update_collections` of the VQ families).

    Args:
      model: a module with `codebook` options and `codebook_levels`.
      params: the parameters after the optimizer's update.
      collections: `{"codebook_stats": {parameter name: averages}}`, or None
        when the codebooks keep no averages (then nothing changes).
      codes: `{parameter name: (indices, latents)}` of the step's batch.
      rng: the step's key.

    Returns:
      `(params, collections)` after the updates.
    """
    if collections is None:
        return params, collections
    params, stats = dict(params), {}
    moving = collections[CODEBOOK_STATS]
    for i, name in enumerate(sorted(moving)):
        indices, latents = codes[name]
        codebook, stats[name] = update_codebook(
            params[name]["codebook"],
            moving[name],
            latents,
            indices,
            model.codebook,
            jax.random.fold_in(rng, _CODEBOOK_STREAM + i),
        )
        params[name] = {**params[name], "codebook": codebook}
    return params, {**collections, CODEBOOK_STATS: stats}


def create_model_state(
    model: nn.Module,
    rng: jax.Array,
    dummy_input: jax.Array,
    tx: optax.GradientTransformation,
    init_images: jax.Array | None = None,
) -> ModelState:
    """`create_train_state` of `LocalizationModel` and `CytoselfModel`."""
    _, rng_init, _ = jax.random.split(rng, 3)
    params = _init_params(model, rng_init, dummy_input)
    if model.codebook.kmeans_init:
        if init_images is None:
            raise ValueError(
                "codebook.kmeans_init needs init_images: a few hundred training "
                "frames, e.g. next(splits['train'].get_batches(rng, 256))['images']"
            )
        latents = _codebook_latents(model, params, jnp.asarray(init_images))
        seed = int(np.asarray(jax.random.key_data(rng_init)).ravel()[-1])
        params = dict(params)
        for name, values in latents.items():
            codebook = kmeans_codebook(
                np.asarray(values), params[name]["codebook"].shape[1], seed=seed
            )
            params[name] = {**params[name], "codebook": jnp.asarray(codebook)}
    collections = None
    if model.codebook.stateful:
        collections = {
            CODEBOOK_STATS: {
                name: init_codebook_state(params[name]["codebook"])
                for name in model.codebook_levels
            }
        }
    return new_train_state(model, params, tx, collections)
