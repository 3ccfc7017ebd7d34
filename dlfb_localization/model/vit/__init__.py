"""A SubCell-style vision transformer family: the ViT and its patches
(`layers`), gated attention pooling (`pooling`), the masked autoencoder's
parts (`mae`) and the model that composes them (`model`). Its contrastive
objectives and views are in `model.contrastive`."""

from dlfb_localization.model.vit.layers import (
    Transformer,
    TransformerBlock,
    TransformerSize,
    ViTEncoder,
    check_patches,
    patchify,
    unpatchify,
)
from dlfb_localization.model.vit.mae import (
    MAEDecoder,
    Masking,
    compute_reconstruction_loss,
    count_kept,
    denormalise_patches,
    normalise_patches,
    random_masking,
)
from dlfb_localization.model.vit.model import (
    AUGMENT_STREAM,
    VIT_SIZES,
    Projector,
    ViTModel,
    ViTOutputs,
    ViTSize,
)
from dlfb_localization.model.vit.pooling import (
    GatedAttentionPooling,
    PooledTokens,
    pool_tokens,
)

__all__ = [
    "AUGMENT_STREAM",
    "VIT_SIZES",
    "GatedAttentionPooling",
    "MAEDecoder",
    "Masking",
    "PooledTokens",
    "Projector",
    "Transformer",
    "TransformerBlock",
    "TransformerSize",
    "ViTEncoder",
    "ViTModel",
    "ViTOutputs",
    "ViTSize",
    "check_patches",
    "compute_reconstruction_loss",
    "count_kept",
    "denormalise_patches",
    "normalise_patches",
    "patchify",
    "pool_tokens",
    "random_masking",
    "unpatchify",
]
