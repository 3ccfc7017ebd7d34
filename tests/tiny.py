"""The tests' tiny model of each family, defined once.

Every test that needs "a small chapter model" builds it from these settings,
so that tests sharing a process (and an optimizer object) share its compiled
programs, and a change of size is made in one place.
Tests that need another value override one field: `{**CHAPTER, "dropout_rate":
0.1}`. Importable from worker subprocesses (no pytest here).
"""

# The chapter's `LocalizationModel`: 16x16 crops -> a 4x4 grid of 8-d codes.
CHAPTER = dict(
    num_classes=4,
    embedding_dim=8,
    num_embeddings=16,
    commitment_cost=0.25,
    dropout_rate=0.0,
    classification_head_layers=2,
)
# cytoself's `CytoselfModel`: two levels, three global sub-vectors.
CYTOSELF = dict(
    num_classes=5,
    embedding_dim=8,
    num_embeddings=16,
    global_splits=3,
    dropout_rate=0.0,
    classification_head_layers=2,
)
