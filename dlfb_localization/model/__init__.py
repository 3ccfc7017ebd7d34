"""The chapter's VQ-VAE (`LocalizationModel`), cytoself's full model
(`CytoselfModel`) and a SubCell-style vision transformer (`ViTModel`)."""

from dlfb_localization.model.codebook import CodebookOptions
from dlfb_localization.model.cytoself import CytoselfModel, CytoselfOutputs
from dlfb_localization.model.decoder import Decoder, Upsample
from dlfb_localization.model.encoder import Encoder, ResnetBlock
from dlfb_localization.model.group_conv import InvariantEncoder
from dlfb_localization.model.head import ClassificationHead
from dlfb_localization.model.quantizer import (
    CodeUsage,
    VectorQuantizer,
    VQOutput,
    compute_code_usage,
    compute_codebook_loss,
    compute_commitment_loss,
    find_nearest_codes,
    lookup_codes,
    quantize,
    straight_through,
)
from dlfb_localization.model.vit import VIT_SIZES, ViTModel, ViTOutputs
from dlfb_localization.model.vqvae import LocalizationModel, ModelOutputs

__all__ = [
    "VIT_SIZES",
    "ClassificationHead",
    "CodeUsage",
    "CodebookOptions",
    "CytoselfModel",
    "CytoselfOutputs",
    "Decoder",
    "Encoder",
    "InvariantEncoder",
    "LocalizationModel",
    "ModelOutputs",
    "ResnetBlock",
    "Upsample",
    "VQOutput",
    "VectorQuantizer",
    "ViTModel",
    "ViTOutputs",
    "compute_code_usage",
    "compute_codebook_loss",
    "compute_commitment_loss",
    "find_nearest_codes",
    "lookup_codes",
    "quantize",
    "straight_through",
]
