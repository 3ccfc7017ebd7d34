"""`LocalizationModel`: the chapter's VQ-VAE with a protein-id head."""

from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlfb_localization.model.codebook import CodebookOptions
from dlfb_localization.model.decoder import Decoder
from dlfb_localization.model.encoder import Encoder
from dlfb_localization.model.group_conv import InvariantEncoder
from dlfb_localization.model.head import ClassificationHead
from dlfb_localization.model.interface import (
    cross_entropy,
    vq_metrics,
    weighted_term,
)
from dlfb_localization.model.quantizer import VectorQuantizer, VQOutput
from dlfb_localization.model.vq_family import (
    VQFamily,
    check_common_fields,
    summarise_level,
)


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
            + weighted_term(classification_weight, classification_loss)
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


# `LocalizationModel.encoder_type`: the chapter's `Encoder` or `InvariantEncoder`.
ENCODERS = ("residual", "d4")


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
