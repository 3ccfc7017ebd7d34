"""`LocalizationModel`: the chapter's VQ-VAE with a protein-id head."""

import functools
from typing import Any, ClassVar, NamedTuple

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
from dlfb_localization.model.decoder import Decoder
from dlfb_localization.model.encoder import Encoder
from dlfb_localization.model.group_conv import InvariantEncoder
from dlfb_localization.model.head import ClassificationHead
from dlfb_localization.model.interface import (
    ModelState,
    cross_entropy,
    vq_metrics,
)
from dlfb_localization.model.quantizer import VectorQuantizer, VQOutput, count_codes


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

    def quantizers(self) -> dict[str, VQOutput]:
        """The quantizer's outputs by the name of its parameters."""
        return {"vector_quantizer": self.vq}

    def losses(
        self, labels: jax.Array, classification_weight: float | jax.Array
    ) -> dict[str, jax.Array]:
        """The chapter's objective: `total_loss = recon_loss + codebook_loss +
        commitment_loss + classification_weight * classification_loss`.

        The first three are the VQ-VAE objective of van den Oord et al. 2017
        (eq. 3; `commitment_loss` already carries beta); the last is cytoself's
        auxiliary protein-id task (mean cross-entropy, unweighted). With
        `classification_weight=0` the head gets exactly zero gradient (the
        ablation); its loss is still reported. `recon_loss` is the mean squared
        error over all pixels against `targets`.
        """
        recon_loss = jnp.mean(jnp.square(self.decoded - self.targets))
        classification_loss = cross_entropy(self.logits, labels)
        total_loss = (
            recon_loss
            + self.vq.codebook_loss
            + self.vq.commitment_loss
            + classification_weight * classification_loss
        )
        return {
            "total_loss": total_loss,
            "recon_loss": recon_loss,
            "codebook_loss": self.vq.codebook_loss,
            "commitment_loss": self.vq.commitment_loss,
            "classification_loss": classification_loss,
        }

    def metrics(self, labels: jax.Array) -> dict[str, jax.Array]:
        """`accuracy` of the head and the quantizer's code use and norms
        (`interface.vq_metrics`)."""
        accuracy = jnp.mean(jnp.argmax(self.logits, -1) == labels)
        return {"accuracy": accuracy, **vq_metrics(self.vq, "")}


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
# `LocalizationModel.encoder_type`: the chapter's `Encoder` or `InvariantEncoder`.
ENCODERS = ("residual", "d4")


class VQFamily:
    """What the VQ-VAE families (`LocalizationModel`, `CytoselfModel`) share
    beyond their layers: input scaling, state creation and the codebooks'
    non-gradient updates (see `model.interface`). A mixin of plain methods;
    the module supplies `standardize_inputs`, `codebook` and `codebook_levels`.
    """

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


class LocalizationModel(VQFamily, nn.Module):
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
      codebook: how the codebook is learned (`CodebookOptions`: EMA updates,
        dead-code restart, k-means initialisation); the default is the
        chapter's gradient-learned, randomly initialised codebook.
      encoder_type: "residual", the chapter's `Encoder`, or "d4", the
        `InvariantEncoder` of D4 group convolutions: turning a crop by 90
        degrees or flipping it turns or flips its grid of codes and leaves its
        codebook histogram unchanged (needs square inputs). Not `encoder`:
        that is the submodule's (and its parameters') name.
    """

    num_classes: int
    embedding_dim: int
    num_embeddings: int
    commitment_cost: float
    dropout_rate: float
    classification_head_layers: int
    standardize_inputs: bool = True
    dtype: Any = jnp.float32
    codebook: CodebookOptions = CodebookOptions()
    encoder_type: str = "residual"

    # Each codebook's parameters' name and level ("": the one level, whose
    # metrics and embeddings carry no suffix).
    codebook_levels: ClassVar[dict[str, str]] = {"vector_quantizer": ""}

    def __post_init__(self) -> None:
        check_common_fields(self)
        if self.encoder_type not in ENCODERS:
            raise ValueError(
                f"encoder_type must be one of {ENCODERS}, got {self.encoder_type!r}"
            )
        super().__post_init__()

    def setup(self) -> None:
        encoder = InvariantEncoder if self.encoder_type == "d4" else Encoder
        self.encoder = encoder(latent_dim=self.embedding_dim, dtype=self.dtype)
        self.vector_quantizer = VectorQuantizer(
            num_embeddings=self.num_embeddings,
            embedding_dim=self.embedding_dim,
            commitment_cost=self.commitment_cost,
            **self.codebook.quantizer_fields(),
        )
        self.decoder = Decoder(latent_dim=self.embedding_dim, dtype=self.dtype)
        self.classification_head = ClassificationHead(
            num_classes=self.num_classes,
            dropout_rate=self.dropout_rate,
            layers=self.classification_head_layers,
            dtype=self.dtype,
        )

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

    def reconstruct(self, x: jax.Array) -> jax.Array:
        """The reconstruction of `x`, on the scale of `x` (no dropout)."""
        vq = self.quantize(self.encode(x))
        return self.restore_scale(self.decode(vq.quantized, x.shape[-1]), x)

    def summarise_frames(self, x: jax.Array) -> dict[str, jax.Array]:
        """Per-frame embeddings: `frame_histograms` `[b, K]` int32 (code use)
        and `frame_vectors` `[b, D]` float32 (mean quantized vector)."""
        return summarise_level(self.quantize(self.encode(x)), self.num_embeddings)

    def codebook_latents(self, x: jax.Array) -> dict[str, jax.Array]:
        """Encoder outputs as each codebook sees them, by its parameters' name
        (what k-means initialisation clusters)."""
        return {"vector_quantizer": self.vector_quantizer.lookup_space(self.encode(x))}


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


def new_train_state(
    model: nn.Module, params, tx: optax.GradientTransformation, collections=None
) -> ModelState:
    """What `TrainState.create` does, with the optimizer's init compiled once
    rather than op by op (a new optimizer object must not recompile the model),
    and with the step an int32 array rather than a Python int, as a restored
    checkpoint has it: the steps then compile once for both."""
    return ModelState(
        step=jnp.zeros((), jnp.int32),
        apply_fn=model.apply,
        params=params,
        tx=tx,
        opt_state=jax.jit(tx.init)(params),
        model=model,
        collections=collections,
    )
