"""Training: the U-Net with MSE, and pix2pix (BCE + L1) with the same U-Net.

Both read the release's channels 0 (protein) and 1 (nucleus), from a split built
with `DatasetBuilder(path, channels=(0, 1))`, resize them to `image_size` inside
the jitted step and train with Adam, in the epoch loop every family shares
(`loop.fit`): with a `store_path`, a checkpoint is written after every epoch,
an interrupted run resumes at the next one and a finished one is restored.
Everything random comes from the `rng` passed in, so a run is a pure function
of it.
"""

import functools
import os
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState

from dlfb_localization import checkpoint
from dlfb_localization.dataset import Dataset
from dlfb_localization.history import History
from dlfb_localization.loop import DataParallel, fit
from dlfb_localization.model.interface import new_train_state
from dlfb_localization.nucleus.model import ConditionalUNet, PatchDiscriminator

__all__ = [
    "GANState",
    "check_split",
    "compute_discriminator_loss",
    "compute_generator_losses",
    "count_embedded_proteins",
    "create_gan_state",
    "create_unet_state",
    "gan_train_step",
    "split_channels",
    "train_gan",
    "train_unet",
    "unet_train_step",
]

Batch = Mapping[str, np.ndarray | jax.Array]


@flax.struct.dataclass
class GANState:
    """The generator's and the discriminator's `TrainState`s, updated together."""

    generator: TrainState
    discriminator: TrainState

    @property
    def step(self) -> jax.Array:
        """Optimizer steps taken (the same for both networks)."""
        return self.generator.step


def check_split(dataset_split: Dataset, num_proteins: int) -> None:
    """Raises ValueError unless the split has protein and nucleus channels and
    its protein codes index an embedding table of `num_proteins` rows."""
    channels = dataset_split.image_shape[-1]
    if channels < 2:
        raise ValueError(
            f"predicting the protein from the nucleus needs 2 channels (0=protein, "
            f"1=nucleus) but the data has {channels}; build it with "
            "DatasetBuilder(path, channels=(0, 1))"
        )
    codes = dataset_split.labels.codes
    if codes.size and not 0 <= int(codes.min()) <= int(codes.max()) < num_proteins:
        raise ValueError(
            f"the split has protein codes {int(codes.min())}..{int(codes.max())} but "
            f"the model embeds {num_proteins} proteins (codes 0..{num_proteins - 1}); "
            "build it with num_proteins=count_unique_proteins(dataset_splits)"
        )


def count_embedded_proteins(state: TrainState) -> int:
    """Rows of a `ConditionalUNet`'s protein embedding table."""
    return state.params["protein_embedding"]["embedding"].shape[0]


# Jitted because the evaluation and the figure also call it on the host, where
# op by op it would compile each resize kernel separately.
@functools.partial(jax.jit, static_argnames="image_size")
def split_channels(images: jax.Array, image_size: int) -> tuple[jax.Array, jax.Array]:
    """The nucleus and protein channels of a batch, resized to `image_size`.

    Args:
      images: `[b, h, w, c]` with channel 0 the protein and 1 the nucleus.
      image_size: side of the square output (linear interpolation, antialiased
        when downsizing).

    Returns:
      `(nucleus, protein)`, each `[b, image_size, image_size, 1]` float32.
    """
    shape = (images.shape[0], image_size, image_size, 2)
    resized = jax.image.resize(images[..., :2], shape, method="linear")
    return resized[..., 1:2], resized[..., 0:1]


# Compiled once per (model, image size) and cached: modules are hashable
# dataclasses. Op by op, or in a fresh `jax.jit` per call, every parameter shape
# compiled its own random-number kernel, which takes seconds each on a CPU.
@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_unet(model: ConditionalUNet, rng: jax.Array, image_size: int):
    image = jnp.zeros((1, image_size, image_size, 1))
    return model.init(rng, image, jnp.zeros((1,), jnp.int32))["params"]


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_discriminator(model: PatchDiscriminator, rng: jax.Array, image_size: int):
    image = jnp.zeros((1, image_size, image_size, 1))
    return model.init(rng, image, image)["params"]


def create_unet_state(
    model: ConditionalUNet,
    rng: jax.Array,
    image_size: int,
    tx: optax.GradientTransformation,
) -> TrainState:
    """A fresh `TrainState` of `model` for `image_size` images, optimized by
    `tx` (e.g. `optax.adam(1e-3)`; build it once: a new optax object is a new
    static field and compiles the steps again)."""
    return new_train_state(model, _init_unet(model, rng, image_size), tx)


def create_gan_state(
    generator: ConditionalUNet,
    discriminator: PatchDiscriminator,
    rng: jax.Array,
    image_size: int,
    learning_rate: float = 2e-4,
) -> GANState:
    """Fresh generator and discriminator with pix2pix's Adam (lr 2e-4, beta1 0.5)."""
    rng_generator, rng_discriminator = jax.random.split(rng)
    tx = optax.adam(learning_rate, b1=0.5)
    return GANState(
        generator=create_unet_state(generator, rng_generator, image_size, tx),
        discriminator=new_train_state(
            discriminator,
            _init_discriminator(discriminator, rng_discriminator, image_size),
            tx,
        ),
    )


@functools.partial(jax.jit, static_argnames="image_size")
def unet_train_step(
    state: TrainState, batch: Batch, image_size: int
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One Adam step on the mean squared error of the predicted protein image.

    Args:
      state: `TrainState` of a `ConditionalUNet`.
      batch: `{"images": [b, h, w, c] float32, "labels": [b] int32}`.
      image_size: side the images are resized to (static).

    Returns:
      `(new_state, {"mse": scalar})`, the loss before the update.
    """
    nucleus, protein = split_channels(batch["images"], image_size)

    def compute_loss(params):
        predicted = state.apply_fn({"params": params}, nucleus, batch["labels"])
        return jnp.mean(jnp.square(predicted - protein))

    mse, grads = jax.value_and_grad(compute_loss)(state.params)
    return state.apply_gradients(grads=grads), {"mse": mse}


def compute_discriminator_loss(
    real_logits: jax.Array, fake_logits: jax.Array
) -> jax.Array:
    """The discriminator's side of pix2pix's conditional GAN loss (Isola et al.
    2017, eq. 1): binary cross-entropy of every patch logit, real pairs labelled
    1 and generated ones 0, halved as pix2pix does to slow D relative to G."""
    real = optax.sigmoid_binary_cross_entropy(real_logits, jnp.ones_like(real_logits))
    fake = optax.sigmoid_binary_cross_entropy(fake_logits, jnp.zeros_like(fake_logits))
    return 0.5 * (real.mean() + fake.mean())


def compute_generator_losses(
    fake_logits: jax.Array,
    predicted: jax.Array,
    protein: jax.Array,
    l1_weight: float,
) -> dict[str, jax.Array]:
    """The generator's objective, `adversarial + l1_weight * l1` (Isola et al.
    2017, eq. 4, with lambda = `l1_weight`).

    `adversarial` is the non-saturating form, -log D(x, G(x)) (BCE against the
    label "real"), rather than log(1 - D), as pix2pix trains it.

    Returns:
      Scalars `generator_loss` (the total), `adversarial_loss` and `l1_loss`.
    """
    adversarial = optax.sigmoid_binary_cross_entropy(
        fake_logits, jnp.ones_like(fake_logits)
    ).mean()
    l1 = jnp.mean(jnp.abs(predicted - protein))
    return {
        "generator_loss": adversarial + l1_weight * l1,
        "adversarial_loss": adversarial,
        "l1_loss": l1,
    }


@functools.partial(jax.jit, static_argnames=("image_size", "l1_weight"))
def gan_train_step(
    state: GANState, batch: Batch, image_size: int, l1_weight: float = 100.0
) -> tuple[GANState, dict[str, jax.Array]]:
    """One simultaneous update of generator and discriminator.

    Both gradients are taken at the parameters before the step: the
    discriminator's on `compute_discriminator_loss` with the generated image
    held fixed (`stop_gradient`), the generator's on `compute_generator_losses`
    through the discriminator. The generator is deterministic (pix2pix's dropout
    noise is left out: the paper found it mostly ignored).

    Args:
      state: `GANState` from `create_gan_state`.
      batch: `{"images": [b, h, w, c] float32, "labels": [b] int32}`.
      image_size: side the images are resized to (static).
      l1_weight: lambda of the L1 term (static; pix2pix's 100).

    Returns:
      `(new_state, metrics)` with `discriminator_loss` and the generator's
      losses, computed before the update.
    """
    nucleus, protein = split_channels(batch["images"], image_size)
    generator, discriminator = state.generator, state.discriminator

    def compute_generator_loss(params):
        predicted = generator.apply_fn({"params": params}, nucleus, batch["labels"])
        fake_logits = discriminator.apply_fn(
            {"params": discriminator.params}, nucleus, predicted
        )
        losses = compute_generator_losses(fake_logits, predicted, protein, l1_weight)
        return losses["generator_loss"], (losses, predicted)

    def compute_loss_of_discriminator(params, predicted):
        real_logits = discriminator.apply_fn({"params": params}, nucleus, protein)
        fake_logits = discriminator.apply_fn(
            {"params": params}, nucleus, jax.lax.stop_gradient(predicted)
        )
        return compute_discriminator_loss(real_logits, fake_logits)

    (_, (losses, predicted)), generator_grads = jax.value_and_grad(
        compute_generator_loss, has_aux=True
    )(generator.params)
    discriminator_loss, discriminator_grads = jax.value_and_grad(
        compute_loss_of_discriminator
    )(discriminator.params, predicted)
    new_state = GANState(
        generator=generator.apply_gradients(grads=generator_grads),
        discriminator=discriminator.apply_gradients(grads=discriminator_grads),
    )
    return new_state, {**losses, "discriminator_loss": discriminator_loss}


def _fit(
    state,
    networks: Mapping[str, TrainState],
    step,
    rng: jax.Array,
    train_split: Dataset,
    *,
    num_epochs: int,
    batch_size: int,
    store_path: str | os.PathLike | None,
    settings: Mapping[str, Any] | None,
    losses: tuple[str, ...],
    **recorded: Any,
):
    """`loop.fit` for either model: `state` placed on the devices, and with a
    `store_path` the run's configuration (`checkpoint.describe_run` of
    `networks`, the training arguments, `recorded` and `settings`)."""
    parallel = DataParallel()
    config = None
    if store_path is not None:
        config = checkpoint.describe_run(
            networks,
            rng,
            {"train": train_split},
            settings,
            num_epochs=num_epochs,
            batch_size=batch_size,
            **recorded,
        )
    return fit(
        parallel.place_state(state),
        step,
        train_split,
        rng,
        num_epochs=num_epochs,
        batch_size=batch_size,
        parallel=parallel,
        store_path=store_path,
        config=config,
        losses=losses,
    )


def train_unet(
    state: TrainState,
    rng: jax.Array,
    train_split: Dataset,
    *,
    num_epochs: int,
    batch_size: int,
    image_size: int,
    store_path: str | os.PathLike | None = None,
    settings: Mapping[str, Any] | None = None,
) -> tuple[TrainState, History]:
    """Trains the U-Net on the mean squared error of the protein image.

    With `store_path`, an Orbax checkpoint (state, epoch, history, run
    configuration) is written after every epoch. Calling again with the same
    configuration restores a finished run without training, or resumes an
    interrupted one at the next epoch, ending bit-identical to an
    uninterrupted run; a different configuration at the same path raises
    `checkpoint.ConfigMismatchError` naming the fields. The configuration
    holds the model's settings, fingerprints of the initial parameters and of
    the optimizer's first update (a changed learning rate shows there), the
    arguments below, the data's fingerprint, `rng` and `settings`.

    Args:
      state: from `create_unet_state`; its embedding table must cover the
        split's protein codes. Its arrays are copied, so it stays usable.
      rng: JAX key for the data order.
      train_split: frames with channels (0, 1).
      num_epochs, batch_size: passes over the split and frames per step (the
        last partial batch of an epoch is dropped, so at most the split's
        size).
      image_size: side the crops are resized to.
      store_path: folder for checkpoints, or None to keep nothing.
      settings: more JSON-ready values recorded in the configuration (e.g. the
        `PredictConfig` fields the model depends on), so that a change in
        them is refused by name.

    Returns:
      `(state, history)`; `history["train"]["mse"]` holds one record per epoch.

    Raises:
      loop.NonFiniteLossError: the loss became NaN or infinite (the last
        checkpoint is kept as it was).
      checkpoint.ConfigMismatchError: `store_path` holds a different run.
    """
    check_split(train_split, count_embedded_proteins(state))
    return _fit(
        state,
        {"unet": state},
        functools.partial(unet_train_step, image_size=image_size),
        rng,
        train_split,
        num_epochs=num_epochs,
        batch_size=batch_size,
        store_path=store_path,
        settings=settings,
        losses=("mse",),
        image_size=image_size,
    )


def train_gan(
    state: GANState,
    rng: jax.Array,
    train_split: Dataset,
    *,
    num_epochs: int,
    batch_size: int,
    image_size: int,
    l1_weight: float = 100.0,
    store_path: str | os.PathLike | None = None,
    settings: Mapping[str, Any] | None = None,
) -> tuple[GANState, History]:
    """Trains pix2pix: the U-Net as generator against a PatchGAN.

    Checkpointed, resumed and restored as `train_unet` is, both networks
    together; the configuration describes each under "generator" and
    "discriminator", and records `l1_weight`.

    Args:
      state: from `create_gan_state`.
      rng: JAX key for the data order.
      train_split, num_epochs, batch_size, image_size: as in `train_unet`.
      l1_weight: lambda of the L1 term.
      store_path, settings: as in `train_unet`.

    Returns:
      `(state, history)` with `generator_loss`, `adversarial_loss`, `l1_loss`
      and `discriminator_loss` per epoch.

    Raises:
      loop.NonFiniteLossError: the generator's or the discriminator's loss
        became NaN or infinite.
      checkpoint.ConfigMismatchError: `store_path` holds a different run.
    """
    check_split(train_split, count_embedded_proteins(state.generator))
    return _fit(
        state,
        {"generator": state.generator, "discriminator": state.discriminator},
        functools.partial(
            gan_train_step, image_size=image_size, l1_weight=float(l1_weight)
        ),
        rng,
        train_split,
        num_epochs=num_epochs,
        batch_size=batch_size,
        store_path=store_path,
        settings=settings,
        losses=("generator_loss", "discriminator_loss"),
        image_size=image_size,
        l1_weight=float(l1_weight),
    )
