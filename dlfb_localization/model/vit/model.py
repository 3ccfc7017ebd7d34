"""`ViTModel`: a SubCell-style vision transformer family, its sizes and its
outputs.

One forward pass (`compute_outputs`) makes the views the objective needs
(two augmented views of each crop when a contrastive task is on, else one),
standardises them, masks a random share of each view's patches, encodes the
kept patches, pools them by gated attention and, as the objective asks,
decodes every patch (MAE) and projects the pooled embedding (contrastive
tasks). The outputs know their losses (`ViTOutputs.losses`), as
`model.interface` asks of every family. The contrastive embedding is the
pooling of the visible patches, so each view is encoded once for all tasks.
"""

import dataclasses
import functools
from typing import Any, ClassVar, Final

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from dlfb_localization.model.contrastive import (
    OBJECTIVES,
    AugmentOptions,
    Objective,
    augment_views,
    combine_objectives,
)
from dlfb_localization.model.interface import (
    AUGMENT_STREAM,
    ModelState,
    new_train_state,
)
from dlfb_localization.model.vit.layers import (
    TransformerSize,
    ViTEncoder,
    check_patches,
    patchify,
)
from dlfb_localization.model.vit.mae import (
    MAEDecoder,
    compute_reconstruction_loss,
    normalise_patches,
    random_masking,
)
from dlfb_localization.model.vit.pooling import GatedAttentionPooling
from dlfb_localization.model.vq_family import prepare_images

__all__ = [
    "AUGMENT_STREAM",
    "VIT_SIZES",
    "Projector",
    "ViTModel",
    "ViTOutputs",
    "ViTSize",
]


@dataclasses.dataclass(frozen=True)
class ViTSize:
    """The shapes of a ViT family member.

    Attributes:
      encoder: the ViT's blocks.
      decoder: the MAE decoder's blocks (used only with reconstruction).
      projector: hidden widths then output width of the contrastive projector
        (used only with a contrastive task).
    """

    encoder: TransformerSize
    decoder: TransformerSize
    projector: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.projector or min(self.projector) < 1:
            raise ValueError(
                f"projector must be a non-empty tuple of widths >= 1, got "
                f"{self.projector}"
            )


# From one that trains in minutes on 2 CPU cores (100x100 crops, patch 10) to
# SubCell's ViT-B with its 8-block, 512-wide decoder and 8192-8192-512 projector.
VIT_SIZES: Final[dict[str, ViTSize]] = {
    "tiny": ViTSize(
        encoder=TransformerSize(width=64, depth=4, num_heads=4, mlp_dim=256),
        decoder=TransformerSize(width=32, depth=2, num_heads=2, mlp_dim=128),
        projector=(256, 256, 64),
    ),
    "small": ViTSize(
        encoder=TransformerSize(width=384, depth=12, num_heads=6, mlp_dim=1536),
        decoder=TransformerSize(width=256, depth=4, num_heads=8, mlp_dim=1024),
        projector=(2048, 2048, 256),
    ),
    "base": ViTSize(
        encoder=TransformerSize(width=768, depth=12, num_heads=12, mlp_dim=3072),
        decoder=TransformerSize(width=512, depth=8, num_heads=16, mlp_dim=2048),
        projector=(8192, 8192, 512),
    ),
}


class Projector(nn.Module):
    """The contrastive tasks' MLP (SubCell: 1536 -> 8192 -> 8192 -> 512):
    Dense and GELU for each hidden width, then a Dense layer to the output.

    Attributes:
      features: hidden widths then the output width.
      dtype: computation dtype (parameters stay float32; output is float32).
    """

    features: tuple[int, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps `[batch, d]` to `[batch, features[-1]]`."""
        for width in self.features[:-1]:
            x = nn.gelu(nn.Dense(width, dtype=self.dtype)(x))
        return nn.Dense(self.features[-1], dtype=self.dtype)(x).astype(jnp.float32)


@struct.dataclass
class ViTOutputs:
    """Named results of a forward pass over `views * batch` crops (view-major:
    rows `v * batch + i` are view v of crop i).

    Attributes:
      embeddings: `[views * batch, pooling_heads * width]` pooled tokens.
      attention: `[views * batch, tokens, pooling_heads]` pooling weights over
        the encoded (kept) tokens.
      predictions: `[views * batch, n_tokens, p * p * c]` decoded patches, or
        None without reconstruction.
      targets: the same shape, each patch of the standardised view
        standardised on its own (`normalise_patches`), or None.
      mask: `[views * batch, n_tokens]`, 1 at masked patches, or None.
      projections: `[views, batch, d]` projector outputs, or None without a
        contrastive task.
      objective: the weights the losses use (static).
    """

    embeddings: jax.Array
    attention: jax.Array
    predictions: jax.Array | None
    targets: jax.Array | None
    mask: jax.Array | None
    projections: jax.Array | None
    objective: Objective = struct.field(pytree_node=False)

    def losses(
        self, labels: jax.Array, classification_weight: float | jax.Array = 0.0
    ) -> dict[str, jax.Array]:
        """The objective's weighted sum and its active terms
        (`contrastive.combine_objectives`): `recon_loss` (MAE on masked
        patches), `nt_xent_loss`, `supcon_loss` (positives: equal `labels`).

        Args:
          labels: `[batch]` class codes of the crops' proteins.
          classification_weight: accepted for `model.interface`; this family
            has no classification head, so it has no effect.
        """
        recon_loss = None
        if self.objective.reconstructs:
            recon_loss = compute_reconstruction_loss(
                self.predictions, self.targets, self.mask
            )
        return combine_objectives(self.objective, recon_loss, self.projections, labels)

    def metrics(self, labels: jax.Array) -> dict[str, jax.Array]:
        """Collapse monitors, never differentiated.

        `attention_entropy`: the pooling weights' entropy over tokens divided
        by its maximum, log(tokens), averaged over crops and heads (1: uniform
        weights, near 0: each head looks at one token). `embedding_spread`:
        the per-dimension standard deviation of the L2-normalised embeddings
        over the batch, averaged and times sqrt(d) (about 1 for spread-out
        embeddings, 0 when every crop maps to the same direction).
        """
        del labels
        weights = self.attention
        entropy = -jnp.sum(weights * jnp.log(jnp.maximum(weights, 1e-12)), axis=1)
        z = self.embeddings / jnp.maximum(
            jnp.linalg.norm(self.embeddings, axis=-1, keepdims=True), 1e-12
        )
        spread = jnp.mean(jnp.std(z, axis=0)) * jnp.sqrt(z.shape[-1])
        return {
            "attention_entropy": jnp.mean(entropy) / jnp.log(weights.shape[1]),
            "embedding_spread": spread,
        }

    def quantizers(self) -> dict:
        """None: this family has no codebook."""
        return {}


@functools.partial(jax.jit, static_argnums=0)
def _init_params(model: nn.Module, rng_init: jax.Array, rng_views: jax.Array, x):
    # One compiled program, cached per (model, input shape), as the VQ
    # families' `_init_params`. Training mode, so that every part the
    # objective uses is built.
    rngs = {"params": rng_init, AUGMENT_STREAM: rng_views}
    return model.init(rngs, x, is_training=True, method="compute_outputs")["params"]


class ViTModel(nn.Module):
    """A SubCell-style ViT: encoder, gated attention pooling and, as the
    objective needs them, an MAE decoder and a contrastive projector.

    Attributes:
      size: the shapes of encoder, decoder and projector (`VIT_SIZES`).
      patch_size: side p of the square patches; divides the crops' size
        (100x100 crops with p = 10 give 100 tokens).
      pooling_heads: gated attention pooling heads (SubCell: 2); the frame
        embedding has `pooling_heads * size.encoder.width` values.
      objective: the tasks' weights, mask ratio and temperature
        (`contrastive.OBJECTIVES`).
      augment: how training views are made (`contrastive.AugmentOptions`);
        gain is off by default, as the standardisation would undo it.
      standardize_inputs: standardise each view per image and channel before
        encoding (as the VQ families do): brightness says little about where
        a protein lives.
      dtype: computation dtype: float32, or bfloat16 on GPU and TPU
        (parameters, pooling weights, losses stay float32).
    """

    size: ViTSize = VIT_SIZES["tiny"]
    patch_size: int = 10
    pooling_heads: int = 2
    objective: Objective = OBJECTIVES["subcell"]
    augment: AugmentOptions = AugmentOptions(gain=0.0)
    standardize_inputs: bool = True
    dtype: Any = jnp.float32

    # No codebooks; contrastive losses compare a batch's crops with each other,
    # so a batch is never split into passes (`model.interface`).
    codebook_levels: ClassVar[dict[str, str]] = {}
    independent_samples: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        if self.pooling_heads < 1:
            raise ValueError(f"pooling_heads must be >= 1, got {self.pooling_heads}")
        for name, kind in (
            ("size", ViTSize),
            ("objective", Objective),
            ("augment", AugmentOptions),
        ):
            if not isinstance(getattr(self, name), kind):
                raise TypeError(
                    f"{name} must be a {kind.__name__}, got "
                    f"{type(getattr(self, name)).__name__}"
                )
        super().__post_init__()

    @property
    def embedding_dim(self) -> int:
        """Values per frame embedding: `pooling_heads * size.encoder.width`."""
        return self.pooling_heads * self.size.encoder.width

    def setup(self) -> None:
        self.encoder = ViTEncoder(self.size.encoder, self.patch_size, self.dtype)
        self.pooling = GatedAttentionPooling(self.pooling_heads, dtype=self.dtype)
        if self.objective.reconstructs:
            self.decoder = MAEDecoder(self.size.decoder, self.dtype)
        if self.objective.contrasts:
            self.projector = Projector(self.size.projector, self.dtype)

    def compute_outputs(self, x: jax.Array, is_training: bool) -> ViTOutputs:
        """Views, masks, encoding, pooling, decoding and projection.

        Draws from the "augment" rng stream (`AUGMENT_STREAM`) for the views'
        augmentation (training only) and the masks (whenever the mask ratio is
        above 0): pass `rngs={"augment": key}`, a fixed key at evaluation so
        that evaluation losses are comparable.

        Args:
          x: `[batch, h, h, c]` float32 square crops; `patch_size` divides h.
          is_training: augment the views. At evaluation the views are the crops
            themselves (two copies, masked differently, with a contrastive
            task). The ViT has no dropout.

        Returns:
          `ViTOutputs` over `views * batch` crops.
        """
        grid = check_patches(x.shape, self.patch_size)
        n_tokens = grid[0] * grid[1]
        num_views = 2 if self.objective.contrasts else 1
        needs_rng = is_training or self.objective.mask_ratio > 0
        rng = self.make_rng(AUGMENT_STREAM) if needs_rng else None
        if is_training:
            views = augment_views(
                jax.random.fold_in(rng, 0), x, self.augment, num_views
            )
        else:
            views = jnp.broadcast_to(x, (num_views, *x.shape)).astype(jnp.float32)
        views = prepare_images(views.reshape(-1, *x.shape[1:]), self.standardize_inputs)
        keep, mask = None, None
        if self.objective.mask_ratio > 0:
            keep, mask = random_masking(
                jax.random.fold_in(rng, 1),
                views.shape[0],
                n_tokens,
                self.objective.mask_ratio,
            )
        tokens = self.encoder(views, keep)
        pooled = self.pooling(tokens)
        predictions, targets = None, None
        if self.objective.reconstructs:
            patches = patchify(views, self.patch_size)
            predictions = self.decoder(tokens, keep, n_tokens, patches.shape[-1])
            targets = normalise_patches(patches)
        projections = None
        if self.objective.contrasts:
            projections = self.projector(pooled.pooled.astype(self.dtype))
            projections = projections.reshape(num_views, x.shape[0], -1)
        return ViTOutputs(
            embeddings=pooled.pooled,
            attention=pooled.weights,
            predictions=predictions,
            targets=targets,
            mask=mask,
            projections=projections,
            objective=self.objective,
        )

    def encode(self, x: jax.Array) -> jax.Array:
        """All tokens of `[batch, h, h, c]` crops, unmasked:
        `[batch, tokens, width]`."""
        return self.encoder(prepare_images(x, self.standardize_inputs))

    def summarise_frames(self, x: jax.Array) -> dict[str, jax.Array]:
        """Per-frame embeddings: `frame_pooled` `[b, pooling_heads * width]`
        float32, the pooled tokens of the whole crop (no mask, no
        augmentation, no randomness); "attention_pooled" in evaluations."""
        return {"frame_pooled": self.pooling(self.encode(x)).pooled}

    def attention_maps(self, x: jax.Array) -> jax.Array:
        """Where each pooling head looks: `[batch, h / p, w / p, pooling_heads]`
        float32 weights on the patch grid, summing to one per head."""
        rows, cols = check_patches(x.shape, self.patch_size)
        weights = self.pooling(self.encode(x)).weights
        return weights.reshape(x.shape[0], rows, cols, self.pooling_heads)

    def __call__(self, x: jax.Array, is_training: bool) -> ViTOutputs:
        """`compute_outputs`."""
        return self.compute_outputs(x, is_training)

    @nn.nowrap
    def create_train_state(
        self,
        rng: jax.Array,
        dummy_input: jax.Array,
        tx: optax.GradientTransformation,
        init_images: jax.Array | None = None,
    ) -> ModelState:
        """Initialises parameters and the optimizer state (`model.interface`).

        Args:
          rng: JAX key; the second of three keys initialises the weights, as
            in the VQ families, the third draws the initial pass's views.
          dummy_input: `[1, h, h, c]` array shaped like the data.
          tx: the optimizer, e.g. SubCell's AdamW with its warm-up and
            decay, `run_families.vit_optimizer(1e-4, num_steps)`; build it
            once per run.
          init_images: unused (this family has nothing to fit to data at
            initialisation); accepted for the interface.

        Returns:
          A `ModelState` at step 0 with no non-gradient collections.
        """
        del init_images
        _, rng_init, rng_views = jax.random.split(rng, 3)
        params = _init_params(self, rng_init, rng_views, jnp.asarray(dummy_input))
        return new_train_state(self, params, tx)

    @nn.nowrap
    def update_collections(self, params, collections, codes, rng):
        """The identity: this family keeps no non-gradient state."""
        del codes, rng
        return params, collections
