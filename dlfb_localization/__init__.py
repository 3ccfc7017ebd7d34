"""dlfb_localization: learn protein subcellular localization from microscopy.

A JAX/Flax implementation of the cytoself-style VQ-VAE of chapter 6 of
*Deep Learning for Biology*, with the data layer for the OpenCell release.
This module imports fast: it pulls in neither plotting nor UMAP.
"""

from dlfb_localization.context import assets

__version__ = "0.1.0"

__all__ = ["__version__", "assets"]
