"""Frame and protein embeddings of a trained model: extraction, projection, spectra.

`utils` holds the numbers (no plotting, so `evaluate` and `export` can use it);
`clustering` and `feature_spectrum` draw them.
"""
