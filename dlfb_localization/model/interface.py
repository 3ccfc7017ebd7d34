"""What every trainable model family provides, so that training, checkpoints,
embeddings and evaluation never ask which family they hold.

A family is a Flax module (`model.vq_family.VQFamily` holds what the VQ-VAE
families share) with:

- `create_train_state(rng, dummy_input, tx, init_images=None) -> ModelState`;
- `compute_outputs(x, is_training) -> outputs`, whose outputs name their own
  objective (`FamilyOutputs`): `outputs.losses(labels, classification_weight)`
  (with "total_loss", what the gradient is taken of), `outputs.metrics(labels)`
  (scalars reported, never differentiated) and `outputs.quantizers()` (each
  codebook's `VQOutput` by its parameters' name);
- `summarise_frames(x) -> {name: [batch, ...] array}`, its per-frame
  embeddings (`frame_histograms`, `frame_vectors`, and the same with a level's
  suffix);
- `codebook_levels`: `{parameter name: level}` of its codebooks ("" for a
  model with one level, whose metrics carry no suffix);
- `update_collections(params, collections, codes, rng)`: the non-gradient
  updates made after each optimizer step (EMA codebooks, dead-code restarts),
  returning `(params, collections)`; the identity for a model without any;
- `independent_samples`: whether its loss is a mean of per-frame terms, so
  that a batch may be split into passes whose gradients are averaged
  (`passes.default_microbatches`). A contrastive loss compares the frames of
  a batch with each other: such a family says False and trains in one pass.

`compute_outputs` draws its randomness from two rng streams: "dropout"
(training only) and `AUGMENT_STREAM` (views and masks made inside the step).
The train step gives it both, from the step's key; evaluation gives it a fixed
`AUGMENT_STREAM` key, so validation losses are comparable across epochs.

Non-gradient state lives in `ModelState.collections`, named like Flax's
variable collections (`{"codebook_stats": {parameter name: averages}}`), beside
the parameters, as `batch_stats` do in Flax's ImageNet example.

Adding a family means one module under `model/` implementing these, and an
entry in `run_families.MODELS` (its module, optimizer and training batches).
"""

from collections.abc import Mapping
from typing import Any, Final, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training.train_state import TrainState

from dlfb_localization.model.quantizer import CodeUsage, VQOutput, compute_code_usage

__all__ = [
    "AUGMENT_STREAM",
    "FamilyOutputs",
    "ModelState",
    "cross_entropy",
    "level_suffix",
    "model_of",
    "new_train_state",
    "usage_metrics",
    "weighted_term",
]


# The rng stream of views and masks made inside a step (see the module's text).
AUGMENT_STREAM: Final = "augment"


class ModelState(TrainState):
    """A `TrainState` that knows its model and carries non-gradient state.

    Attributes:
      model: the Flax module whose `apply` is `apply_fn` (static).
      collections: non-gradient variable collections, e.g.
        `{"codebook_stats": {...}}`, or None for a model without any.
    """

    model: nn.Module | None = struct.field(pytree_node=False, default=None)
    collections: Any = None


class FamilyOutputs(Protocol):
    """A forward pass's outputs, which know the family's objective."""

    def losses(
        self, labels: jax.Array, classification_weight: float | jax.Array
    ) -> dict[str, jax.Array]: ...

    def metrics(self, labels: jax.Array) -> dict[str, jax.Array]: ...

    def quantizers(self) -> dict[str, VQOutput]: ...


def model_of(state: TrainState) -> nn.Module:
    """The model behind a train state: `ModelState.model`, or the module whose
    bound `apply` a hand-built `TrainState` carries.

    Raises:
      TypeError: the state's `apply_fn` is not a Flax module's `apply`.
    """
    model = getattr(state, "model", None)
    if model is None:
        model = getattr(state.apply_fn, "__self__", None)
    if not isinstance(model, nn.Module):
        raise TypeError(
            "the train state does not name its model: build it with the model's "
            "create_train_state(...), or TrainState.create(apply_fn=model.apply, ...)"
        )
    return model


def level_suffix(level: str) -> str:
    """The suffix of a codebook level's metric and embedding names: "" for a
    one-level model, e.g. "_global" for cytoself's global level."""
    return f"_{level}" if level else ""


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy against integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(
        logits=logits, labels=labels
    ).mean()


def weighted_term(weight: float | jax.Array, loss: jax.Array) -> jax.Array | float:
    """`weight * loss`, a term of an objective; 0.0 where `weight` is the
    number 0 rather than an array (`train_step` passes an ablated head's
    weight so). The term is then not in the objective at all, so no gradient
    is computed for it: without this, the head's backward pass (at the demo's
    sizes a tenth of a one-core step) ran only to be multiplied by zero. The
    loss itself is still reported, and the objective's value is the same."""
    if isinstance(weight, int | float) and weight == 0:
        return 0.0
    return weight * loss


def _usage(usage: CodeUsage | VQOutput, suffix: str) -> dict[str, jax.Array]:
    return {
        f"perplexity{suffix}": usage.perplexity,
        f"codebook_used_fraction{suffix}": usage.used_fraction,
        f"codebook_max_share{suffix}": usage.max_share,
    }


def usage_metrics(
    indices_by_level: Mapping[str, jax.Array], sizes: Mapping[str, int]
) -> dict[str, jax.Array]:
    """`perplexity`, `codebook_used_fraction` and `codebook_max_share` of each
    level's code indices, with the level's suffix."""
    metrics = {}
    for level, indices in indices_by_level.items():
        usage = compute_code_usage(indices, sizes[level])
        metrics.update(_usage(usage, level_suffix(level)))
    return metrics


def vq_metrics(vq: VQOutput, level: str) -> dict[str, jax.Array]:
    """One quantizer's reported scalars, with the level's suffix: its code use
    (as `usage_metrics`) and the norms of its inputs and codes."""
    suffix = level_suffix(level)
    return {
        **_usage(vq, suffix),
        f"latent_norm{suffix}": vq.latent_norm,
        f"codebook_norm{suffix}": vq.codebook_norm,
    }


# One module object per distinct model in a process (`new_train_state`);
# Flax modules are immutable templates, hashed and compared by their fields.
_MODELS: dict[nn.Module, nn.Module] = {}


def new_train_state(
    model: nn.Module, params, tx: optax.GradientTransformation, collections=None
) -> ModelState:
    """What `TrainState.create` does, with the optimizer's init compiled once
    rather than op by op (a new optimizer object must not recompile the model),
    and with the step an int32 array rather than a Python int, as a restored
    checkpoint has it: the steps then compile once for both.

    Equal models (the same class and fields) share one module object, so that
    their states' `apply_fn` are equal: `jit` keys a step's program by the
    state's static fields, and Python compares bound methods by the identity
    of their object. With the same optimizer object too (`run_families`
    makes one per setting), a second state of the same model (the demo's
    second training, another seed, a resumed run) reuses the steps the first
    one compiled."""
    model = _MODELS.setdefault(model, model)
    return ModelState(
        step=jnp.zeros((), jnp.int32),
        apply_fn=model.apply,
        params=params,
        tx=tx,
        opt_state=jax.jit(tx.init)(params),
        model=model,
        collections=collections,
    )
