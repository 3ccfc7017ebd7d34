"""`LocalizationModel`: the chapter's VQ-VAE with a protein-id head."""

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training.train_state import TrainState

from dlfb_localization.model.decoder import Decoder
from dlfb_localization.model.encoder import Encoder
from dlfb_localization.model.head import ClassificationHead
from dlfb_localization.model.quantizer import VectorQuantizer, VQOutput


class ModelOutputs(NamedTuple):
    """Named results of a forward pass.

    Attributes:
      decoded: `[batch, height, width, channels]` reconstruction.
      logits: `[batch, num_classes]` protein-id logits.
      vq: the quantizer's outputs (latents, indices, losses, codebook usage).
      targets: what `decoded` is compared with: the input as the encoder saw
        it (standardized per image when the model standardizes its inputs).
    """

    decoded: jax.Array
    logits: jax.Array
    vq: VQOutput
    targets: jax.Array


def _image_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-image, per-channel mean and standard deviation (floored at 1e-6)."""
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    std = jnp.std(x, axis=(1, 2), keepdims=True)
    return mean, jnp.maximum(std, 1e-6)


@functools.partial(jax.jit, static_argnums=0)
def _init_params(model: nn.Module, rng: jax.Array, dummy_input: jax.Array):
    # One compiled program instead of one per op, cached per (model, input shape):
    # modules are hashable dataclasses. Op by op, initialization compiled a
    # random-number kernel per parameter shape, which took seconds on CPU.
    return model.init(rng, dummy_input, is_training=False)["params"]


# float16 would need loss scaling; bfloat16 has float32's exponent range.
_COMPUTE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


class LocalizationModel(nn.Module):
    """VQ-VAE (encoder, vector quantizer, decoder) with a classification head.

    The chapter's simplified cytoself: a 100x100xC crop is encoded to a 25x25
    grid, each position is snapped to one of `num_embeddings` codes, the decoder
    reconstructs the crop and an MLP on the flattened codes predicts the protein.

    Attributes:
      num_classes: number of protein ids the head predicts.
      embedding_dim: code length D (encoder output channels); even.
      num_embeddings: codebook size K.
      commitment_cost: beta, the weight of the commitment loss.
      dropout_rate: dropout in the head's hidden layers, in `[0, 1)`.
      classification_head_layers: Dense layers in the head, at least 1.
      standardize_inputs: standardize each image (and channel) to zero mean and
        unit variance before encoding; the decoder then reconstructs the
        standardized image. Without it (the book's model) a frame's brightness,
        which says little about where its protein lives, dominates the
        reconstruction loss and the codes; with it, codes describe patterns.
        `reconstruct` maps reconstructions back to the input's scale either way.
      dtype: computation dtype of the encoder, decoder and head: float32 (the
        default) or bfloat16 for mixed precision on GPU and TPU. Parameters,
        optimizer state, the quantizer (distances, codes) and the losses stay
        float32.
    """

    num_classes: int
    embedding_dim: int
    num_embeddings: int
    commitment_cost: float
    dropout_rate: float
    classification_head_layers: int
    standardize_inputs: bool = True
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        if jnp.dtype(self.dtype) not in _COMPUTE_DTYPES:
            raise ValueError(
                f"dtype must be one of {[str(d) for d in _COMPUTE_DTYPES]}, "
                f"got {self.dtype}"
            )
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.embedding_dim < 2 or self.embedding_dim % 2:
            raise ValueError(
                "embedding_dim must be even and >= 2 (the encoder's first conv has "
                f"embedding_dim // 2 channels), got {self.embedding_dim}"
            )
        if self.num_embeddings < 1:
            raise ValueError(f"num_embeddings must be >= 1, got {self.num_embeddings}")
        if self.commitment_cost < 0:
            raise ValueError(
                f"commitment_cost must be >= 0, got {self.commitment_cost}"
            )
        if not 0 <= self.dropout_rate < 1:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if self.classification_head_layers < 1:
            raise ValueError(
                "classification_head_layers must be >= 1, got "
                f"{self.classification_head_layers}"
            )
        super().__post_init__()

    def setup(self) -> None:
        self.encoder = Encoder(latent_dim=self.embedding_dim, dtype=self.dtype)
        self.vector_quantizer = VectorQuantizer(
            num_embeddings=self.num_embeddings,
            embedding_dim=self.embedding_dim,
            commitment_cost=self.commitment_cost,
        )
        self.decoder = Decoder(latent_dim=self.embedding_dim, dtype=self.dtype)
        self.classification_head = ClassificationHead(
            num_classes=self.num_classes,
            dropout_rate=self.dropout_rate,
            layers=self.classification_head_layers,
            dtype=self.dtype,
        )

    def prepare_inputs(self, x: jax.Array) -> jax.Array:
        """The images as the encoder sees them and the decoder reconstructs them."""
        if not self.standardize_inputs:
            return x
        mean, std = _image_moments(x)
        return (x - mean) / std

    def restore_scale(self, decoded: jax.Array, x: jax.Array) -> jax.Array:
        """Maps a reconstruction of `prepare_inputs(x)` back to the scale of `x`."""
        if not self.standardize_inputs:
            return decoded
        mean, std = _image_moments(x)
        return decoded * std + mean

    def encode(self, x: jax.Array) -> jax.Array:
        """Maps `[batch, H, W, C]` images to `[batch, H/4, W/4, D]` float32
        latents."""
        return self.encoder(self.prepare_inputs(x)).astype(jnp.float32)

    def quantize(self, latents: jax.Array) -> VQOutput:
        """Snaps `[batch, h, w, D]` latents to the codebook (see `VQOutput`)."""
        return self.vector_quantizer(latents)

    def decode(self, quantized: jax.Array, out_channels: int) -> jax.Array:
        """Maps `[batch, h, w, D]` codes to `[batch, 4h, 4w, out_channels]`."""
        return self.decoder(quantized, out_channels).astype(jnp.float32)

    def classify(self, quantized: jax.Array, is_training: bool) -> jax.Array:
        """Maps `[batch, h, w, D]` codes to `[batch, num_classes]` logits."""
        return self.classification_head(
            quantized.reshape(quantized.shape[0], -1), is_training
        ).astype(jnp.float32)

    def compute_outputs(self, x: jax.Array, is_training: bool) -> ModelOutputs:
        """Runs a forward pass and returns named outputs.

        Args:
          x: `[batch, height, width, channels]` float32 images; height and width
            divisible by 4.
          is_training: enables dropout in the head (needs a "dropout" rng).

        Returns:
          `ModelOutputs`; `decoded` has the shape of `x` and is on the scale of
          `targets` (see `restore_scale`).
        """
        targets = self.prepare_inputs(x)
        vq = self.quantize(self.encoder(targets).astype(jnp.float32))
        return ModelOutputs(
            decoded=self.decode(vq.quantized, out_channels=x.shape[-1]),
            logits=self.classify(vq.quantized, is_training),
            vq=vq,
            targets=targets,
        )

    def __call__(
        self, x: jax.Array, is_training: bool
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
        """Runs a forward pass, returning the chapter's tuple.

        Args:
          x: `[batch, height, width, channels]` float32 images.
          is_training: enables dropout in the head (needs a "dropout" rng).

        Returns:
          `(decoded, perplexity, codebook_loss, commitment_loss, logits)`:
          `[batch, height, width, channels]`, three scalars, `[batch,
          num_classes]`. `compute_outputs` gives the same by name, and more.
        """
        outputs = self.compute_outputs(x, is_training)
        return (
            outputs.decoded,
            outputs.vq.perplexity,
            outputs.vq.codebook_loss,
            outputs.vq.commitment_loss,
            outputs.logits,
        )

    def get_encoding_indices(self, x: jax.Array) -> jax.Array:
        """Nearest-code indices of images.

        Use as `state.apply_fn({"params": params}, x,
        method=LocalizationModel.get_encoding_indices)`.

        Args:
          x: `[batch, H, W, C]` images.

        Returns:
          `[batch, H/4, W/4]` int32 code indices (reshape to `[batch, -1]` for
          per-frame histograms).
        """
        return self.vector_quantizer.get_closest_codebook_indices(self.encode(x))

    @nn.nowrap
    def create_train_state(
        self, rng: jax.Array, dummy_input: jax.Array, tx: optax.GradientTransformation
    ) -> TrainState:
        """Initializes parameters and the optimizer state.

        Args:
          rng: JAX key. It is split as in the book (the second of three keys
            initializes the weights), so a key gives the book's initial weights.
          dummy_input: `[1, H, W, C]` array shaped like the data, e.g.
            `dataset.get_dummy_input()`.
          tx: the optimizer, e.g. `optax.adam(1e-3)`. Build it once per run: a
            new optax object is a new static field and recompiles the steps.

        Returns:
          A `TrainState` with `apply_fn=self.apply`, step 0.
        """
        _, rng_init, _ = jax.random.split(rng, 3)
        return new_train_state(
            self.apply, _init_params(self, rng_init, dummy_input), tx
        )


def new_train_state(apply_fn, params, tx: optax.GradientTransformation) -> TrainState:
    """What `TrainState.create` does, with the optimizer's init compiled once
    rather than op by op (a new optimizer object must not recompile the model),
    and with the step an int32 array rather than a Python int, as a restored
    checkpoint has it: the steps then compile once for both."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        apply_fn=apply_fn,
        params=params,
        tx=tx,
        opt_state=jax.jit(tx.init)(params),
    )
