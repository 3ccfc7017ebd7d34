"""`CytoselfModel`: the full model of the cytoself paper (Kobayashi et al. 2022).

The chapter's model has one level: a 25x25 grid of codes. Cytoself adds a
second, global level that sees the whole crop:

    image (100x100, protein + nucleus)
      -> local encoder  -> 25x25xD   -> local codebook  (K codes of length D)
      -> global encoder -> 4x4x(9D)  -> global codebook (K codes of length D),
                                        each position split into 9 sub-vectors
    global codes -> global decoder -> 25x25xD, a prediction of the local
                                      encoder's output
    [local codes, global decoder's output] -> image decoder -> image
    local codes, global codes -> one classification head each (protein id)

The loss is cytoself's: the image's squared error divided by the data's
variance, the global decoder's squared error against the local encoder output,
the two quantizers' codebook and commitment terms, and the two heads'
cross-entropies weighted by `classification_weight`.

Encoder blocks. Cytoself's encoders stack EfficientNet (MBConv) blocks; this
one uses the chapter's residual blocks (GroupNorm, swish, 3x3 convolutions):
they are already tested here, they make the chapter's model and this one differ
only in what the paper added (the levels, split quantization, the heads), and
depthwise convolutions, MBConv's core, run far below a CPU's matmul rate in
XLA, where this library's tests and demo run.
"""

from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlfb_localization.model.codebook import CodebookOptions
from dlfb_localization.model.decoder import Decoder
from dlfb_localization.model.encoder import Encoder, ResnetBlock
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

__all__ = ["LEVELS", "CytoselfModel", "CytoselfOutputs"]

# The two levels, finest first, by their quantizers' parameter names.
_CODEBOOK_LEVELS = {"vq_local": "local", "vq_global": "global"}
LEVELS = tuple(_CODEBOOK_LEVELS.values())
# The global grid for 100x100 crops (25 -> 13 -> 7 -> 4 with stride-2 convs).
_GLOBAL_DOWNSAMPLINGS = 3


class CytoselfOutputs(NamedTuple):
    """Named results of a forward pass of `CytoselfModel`.

    Attributes:
      decoded: `[batch, H, W, C]` reconstruction, on the scale of `targets`.
      targets: the input as the encoder saw it (standardized per image and
        channel when the model standardizes its inputs).
      vq_local: the local quantizer's outputs (`[batch, H/4, W/4]` indices).
      vq_global: the global quantizer's outputs (`[batch, h, w, splits]`).
      logits_local: `[batch, num_classes]` from the local codes.
      logits_global: `[batch, num_classes]` from the global codes.
      local_from_global: `[batch, H/4, W/4, D]` the global decoder's output.
      local_latents: `[batch, H/4, W/4, D]` the local encoder's output, what
        `local_from_global` is trained to predict.
      data_variance: the model's `data_variance` (the image loss's divisor).
    """

    decoded: jax.Array
    targets: jax.Array
    vq_local: VQOutput
    vq_global: VQOutput
    logits_local: jax.Array
    logits_global: jax.Array
    local_from_global: jax.Array
    local_latents: jax.Array
    data_variance: float

    def quantizers(self) -> dict[str, VQOutput]:
        """The quantizers' outputs by the name of their parameters."""
        return {"vq_local": self.vq_local, "vq_global": self.vq_global}

    def _levels(self) -> dict[str, tuple[VQOutput, jax.Array]]:
        return {
            "local": (self.vq_local, self.logits_local),
            "global": (self.vq_global, self.logits_global),
        }

    def losses(
        self, labels: jax.Array, classification_weight: float | jax.Array
    ) -> dict[str, jax.Array]:
        """Cytoself's objective: `recon_loss` (the image's squared error divided
        by `data_variance`) + `global_recon_loss` (the global decoder's squared
        error against the local encoder's output, which gets no gradient from
        it) + both quantizers' codebook and commitment terms +
        `classification_weight` times the sum of both heads' cross-entropies.
        The components are reported per level with `_local` and `_global`
        suffixes; `codebook_loss`, `commitment_loss` and `classification_loss`
        are the sums over levels."""
        squared_error = jnp.mean(jnp.square(self.decoded - self.targets))
        losses = {
            "recon_loss": squared_error / self.data_variance,
            "global_recon_loss": jnp.mean(
                jnp.square(
                    self.local_from_global - jax.lax.stop_gradient(self.local_latents)
                )
            ),
        }
        for level, (vq, logits) in self._levels().items():
            losses[f"codebook_loss_{level}"] = vq.codebook_loss
            losses[f"commitment_loss_{level}"] = vq.commitment_loss
            losses[f"classification_loss_{level}"] = cross_entropy(logits, labels)
        for name in ("codebook_loss", "commitment_loss", "classification_loss"):
            losses[name] = losses[f"{name}_local"] + losses[f"{name}_global"]
        losses["total_loss"] = (
            losses["recon_loss"]
            + losses["global_recon_loss"]
            + losses["codebook_loss"]
            + losses["commitment_loss"]
            + weighted_term(classification_weight, losses["classification_loss"])
        )
        return losses

    def metrics(self, labels: jax.Array) -> dict[str, jax.Array]:
        """Each level's head accuracy, code use and norms, with the level's
        suffix; `accuracy` is the global head's."""
        metrics = {}
        for level, (vq, logits) in self._levels().items():
            accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
            metrics[f"accuracy_{level}"] = accuracy
            metrics.update(vq_metrics(vq, level))
        metrics["accuracy"] = metrics["accuracy_global"]
        return metrics


class GlobalEncoder(nn.Module):
    """From the local grid to the global one: three stride-2 3x3 convolutions
    (25 -> 13 -> 7 -> 4 positions), each followed by a residual block; channels
    double at each step, ending at `out_channels`."""

    latent_dim: int
    out_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        widths = (2 * self.latent_dim, 4 * self.latent_dim, self.out_channels)
        for width in widths:
            x = nn.Conv(width, (3, 3), strides=(2, 2), padding=1, dtype=self.dtype)(
                nn.swish(x)
            )
            x = ResnetBlock(width, dtype=self.dtype)(x)
        return x


class GlobalDecoder(nn.Module):
    """From the global codes to a `[batch, height, width, latent_dim]`
    prediction of the local encoder's output: a 3x3 convolution, bilinear
    resizing to the local grid, a 3x3 convolution and two residual blocks."""

    latent_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, height: int, width: int) -> jax.Array:
        x = nn.Conv(2 * self.latent_dim, (3, 3), padding=1, dtype=self.dtype)(x)
        x = jax.image.resize(
            nn.swish(x), (x.shape[0], height, width, x.shape[3]), "bilinear"
        )
        x = nn.Conv(self.latent_dim, (3, 3), padding=1, dtype=self.dtype)(x)
        x = ResnetBlock(self.latent_dim, dtype=self.dtype)(x)
        return ResnetBlock(self.latent_dim, dtype=self.dtype)(x)


class CytoselfModel(VQFamily, nn.Module):
    """Cytoself's two-level VQ-VAE with split quantization and two heads.

    Use it like `LocalizationModel`: `create_train_state`, then `train.train`
    (which reads `compute_outputs`), `embeddings.get_frame_embeddings` (both
    levels) and `evaluate.evaluate`.

    Attributes:
      num_classes: protein ids the heads predict.
      embedding_dim: code length D of both codebooks, and the local level's
        channels (cytoself: 64).
      num_embeddings: size K of each codebook (cytoself: 2048).
      global_splits: sub-vectors per global position (cytoself: 9); the global
        grid has `global_splits * embedding_dim` channels (576).
      commitment_cost: beta of both quantizers.
      dropout_rate: dropout in the heads' hidden layers.
      classification_head_layers: Dense layers per head (cytoself: 3, i.e. two
        hidden layers of 1000).
      standardize_inputs: as `LocalizationModel.standardize_inputs`.
      data_variance: the variance the image's squared error is divided by
        (cytoself's normalisation): the training images' variance as the
        model sees them; 1 for standardized inputs.
      dtype: computation dtype (float32 or bfloat16), as `LocalizationModel`'s.
      codebook: `CodebookOptions`, applied to both codebooks.
    """

    num_classes: int
    embedding_dim: int = 64
    num_embeddings: int = 2048
    global_splits: int = 9
    commitment_cost: float = 0.25
    dropout_rate: float = 0.45
    classification_head_layers: int = 3
    standardize_inputs: bool = True
    data_variance: float = 1.0
    dtype: Any = jnp.float32
    codebook: CodebookOptions = CodebookOptions()

    codebook_levels: ClassVar[dict[str, str]] = _CODEBOOK_LEVELS

    def __post_init__(self) -> None:
        check_common_fields(self)
        if self.global_splits < 1:
            raise ValueError(f"global_splits must be >= 1, got {self.global_splits}")
        if not self.data_variance > 0:
            raise ValueError(f"data_variance must be > 0, got {self.data_variance}")
        super().__post_init__()

    def setup(self) -> None:
        dim = self.embedding_dim
        self.local_encoder = Encoder(latent_dim=dim, dtype=self.dtype)
        self.global_encoder = GlobalEncoder(
            dim, self.global_splits * dim, dtype=self.dtype
        )
        self.vq_local = VectorQuantizer(
            self.num_embeddings,
            dim,
            self.commitment_cost,
            **self.codebook.quantizer_fields(),
        )
        self.vq_global = VectorQuantizer(
            self.num_embeddings,
            dim,
            self.commitment_cost,
            num_splits=self.global_splits,
            **self.codebook.quantizer_fields(),
        )
        self.global_decoder = GlobalDecoder(dim, dtype=self.dtype)
        self.merge = nn.Conv(dim, (3, 3), padding=1, dtype=self.dtype)
        self.decoder = Decoder(latent_dim=dim, dtype=self.dtype)
        head = {
            "num_classes": self.num_classes,
            "dropout_rate": self.dropout_rate,
            "layers": self.classification_head_layers,
            "dtype": self.dtype,
        }
        self.head_local = ClassificationHead(**head)
        self.head_global = ClassificationHead(**head)

    def _encode(self, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
        local = self.local_encoder(targets)
        global_ = self.global_encoder(local)
        return local.astype(jnp.float32), global_.astype(jnp.float32)

    def quantize_levels(self, x: jax.Array) -> dict[str, VQOutput]:
        """Both levels' quantizer outputs for `[batch, H, W, C]` images."""
        local, global_ = self._encode(self.prepare_inputs(x))
        return {"local": self.vq_local(local), "global": self.vq_global(global_)}

    def _decode(
        self, vq_local: VQOutput, vq_global: VQOutput, out_channels: int
    ) -> tuple[jax.Array, jax.Array]:
        _, height, width, _ = vq_local.quantized.shape
        local_from_global = self.global_decoder(vq_global.quantized, height, width)
        merged = self.merge(
            jnp.concatenate(
                [vq_local.quantized.astype(self.dtype), local_from_global], -1
            )
        )
        decoded = self.decoder(merged, out_channels)
        return decoded.astype(jnp.float32), local_from_global.astype(jnp.float32)

    def _classify(self, head, quantized: jax.Array, is_training: bool) -> jax.Array:
        flat = quantized.reshape(quantized.shape[0], -1)
        return head(flat, is_training).astype(jnp.float32)

    def compute_outputs(self, x: jax.Array, is_training: bool) -> CytoselfOutputs:
        """Runs a forward pass and returns named outputs.

        Args:
          x: `[batch, H, W, C]` float32 images; H and W divisible by 4.
          is_training: enables dropout in the heads (needs a "dropout" rng).
        """
        targets = self.prepare_inputs(x)
        local, global_ = self._encode(targets)
        vq_local, vq_global = self.vq_local(local), self.vq_global(global_)
        decoded, local_from_global = self._decode(vq_local, vq_global, x.shape[-1])
        return CytoselfOutputs(
            decoded=decoded,
            targets=targets,
            vq_local=vq_local,
            vq_global=vq_global,
            logits_local=self._classify(
                self.head_local, vq_local.quantized, is_training
            ),
            logits_global=self._classify(
                self.head_global, vq_global.quantized, is_training
            ),
            local_from_global=local_from_global,
            local_latents=local,
            data_variance=self.data_variance,
        )

    def __call__(self, x: jax.Array, is_training: bool) -> CytoselfOutputs:
        """`compute_outputs`."""
        return self.compute_outputs(x, is_training)

    def reconstruct(self, x: jax.Array) -> jax.Array:
        """The reconstruction of `x`, on the scale of `x` (no dropout)."""
        levels = self.quantize_levels(x)
        decoded, _ = self._decode(levels["local"], levels["global"], x.shape[-1])
        return self.restore_scale(decoded, x)

    def get_encoding_indices(self, x: jax.Array, level: str = "local") -> jax.Array:
        """Code indices of one level: `[batch, H/4, W/4]` for "local",
        `[batch, h, w, global_splits]` for "global"."""
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        return self.quantize_levels(x)[level].indices

    def summarise_frames(self, x: jax.Array) -> dict[str, jax.Array]:
        """Per-frame embeddings of both levels: `frame_histograms` `[b, K]`
        and `frame_vectors` `[b, D]` of the local level, and the same with a
        `_global` suffix (a global position's nine sub-vectors count as nine
        positions, so a global histogram sums to `h * w * global_splits`)."""
        levels = self.quantize_levels(x)
        out = summarise_level(levels["local"], self.num_embeddings)
        for name, value in summarise_level(
            levels["global"], self.num_embeddings
        ).items():
            out[f"{name}_global"] = value
        return out

    def codebook_latents(self, x: jax.Array) -> dict[str, jax.Array]:
        """Encoder outputs as each codebook sees them, by its parameters' name."""
        levels = self.quantize_levels(x)
        return {name: levels[level].latents for name, level in _CODEBOOK_LEVELS.items()}
