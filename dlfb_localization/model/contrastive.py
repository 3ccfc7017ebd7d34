"""SubCell's objectives beside reconstruction: contrastive losses, the views
they compare, and their weighted sum.

SubCell (Gupta et al. 2024) trains a ViT with three tasks: masked-autoencoder
reconstruction, a cell-specific task (NT-Xent between two augmented views of
the same crop: Chen et al. 2020, SimCLR) and a protein-specific task (the
supervised contrastive loss of Khosla et al. 2020, whose positives are the
other crops of the same protein). Both contrastive losses compare
L2-normalised projections. `OBJECTIVES` holds SubCell's weights and two
one-task variants.

The views are made on the device, inside the jitted step, from a key
(`augment_views`): random quarter turns and flips, a random resized crop and a
per-channel intensity jitter. Everything here is a pure function of its inputs.
"""

import dataclasses
import math
from typing import Final

import jax
import jax.numpy as jnp

from dlfb_localization.model.group_conv import D4_ORDER, d4_apply

__all__ = [
    "OBJECTIVES",
    "AugmentOptions",
    "Objective",
    "augment_batch",
    "augment_views",
    "combine_objectives",
    "nt_xent_loss",
    "supervised_contrastive_loss",
]

# Stands in for -inf on the similarity matrix's diagonal: exp() of it is 0 in
# float32, and unlike -inf it gives no inf - inf = nan in masked sums.
_NEVER = -1e9


def _normalised_similarities(z: jax.Array, temperature: float) -> jax.Array:
    """`[n, n]` cosine similarities / temperature, the diagonal excluded."""
    z = z.astype(jnp.float32)
    z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
    logits = z @ z.T / temperature
    return jnp.where(jnp.eye(z.shape[0], dtype=bool), _NEVER, logits)


def nt_xent_loss(z1: jax.Array, z2: jax.Array, temperature: float = 0.1) -> jax.Array:
    """NT-Xent, SimCLR's loss (Chen et al. 2020, eq. 1), over two views.

    For each of the 2n projections, the positive is the other view of the same
    crop and the negatives are the 2(n - 1) other projections of the batch:
    `l(i, j) = -log exp(s_ij / t) / sum_{k != i} exp(s_ik / t)` with `s` the
    cosine similarity, averaged over all 2n anchors.

    Args:
      z1: `[n, d]` projections of the first views (need not be normalised).
      z2: `[n, d]` projections of the second views, row i the same crop.
      temperature: t (SubCell and SimCLR: 0.1).

    Returns:
      Scalar float32 loss.
    """
    n = z1.shape[0]
    logits = _normalised_similarities(jnp.concatenate([z1, z2]), temperature)
    partner = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
    log_prob = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_prob, partner[:, None], axis=1))


def supervised_contrastive_loss(
    z: jax.Array, protein_ids: jax.Array, temperature: float = 0.1
) -> jax.Array:
    """The supervised contrastive loss (Khosla et al. 2020, eq. 2, L_out).

    For anchor i, the positives P(i) are the other projections with the same
    protein id and the denominator runs over every projection but i:
    `l_i = -1/|P(i)| sum_{p in P(i)} log exp(s_ip / t) / sum_{a != i} exp(s_ia / t)`,
    averaged over the anchors that have a positive (0 if none has).

    Args:
      z: `[n, d]` projections (all views of the batch, stacked).
      protein_ids: `[n]` int ids (or class codes); equal ids are positives.
      temperature: t.

    Returns:
      Scalar float32 loss.
    """
    logits = _normalised_similarities(z, temperature)
    log_prob = jax.nn.log_softmax(logits, axis=-1)
    same = protein_ids[:, None] == protein_ids[None, :]
    positives = same & ~jnp.eye(z.shape[0], dtype=bool)
    counts = jnp.sum(positives, axis=1)
    per_anchor = -jnp.sum(jnp.where(positives, log_prob, 0.0), axis=1)
    per_anchor = per_anchor / jnp.maximum(counts, 1)
    has_positive = counts > 0
    return jnp.sum(jnp.where(has_positive, per_anchor, 0.0)) / jnp.maximum(
        jnp.sum(has_positive), 1
    )


@dataclasses.dataclass(frozen=True)
class AugmentOptions:
    """How `augment_batch` perturbs a crop. Each part is off at its neutral
    value, and skipped entirely then (the output is bit-identical to the input).

    Attributes:
      d4: a random one of the 8 quarter turns and flips (exact).
      crop_scale: `(min, max)` share of the crop's area the random resized crop
        keeps, resized back to the full size bilinearly; `(1, 1)` with
        `crop_ratio=(1, 1)` keeps the whole crop.
      crop_ratio: `(min, max)` aspect ratio (width / height) of the kept
        region, drawn log-uniformly.
      gain: per-channel intensity scale drawn from `[1 - gain, 1 + gain]`
        (0: off). A model that standardises each channel of its inputs undoes
        it; `gamma` survives that.
      gamma: per-channel contrast jitter: each channel, rescaled to [0, 1] by
        its own minimum and maximum, is raised to `exp(u)`, `u` uniform in
        `[-gamma, gamma]`, and mapped back (0: off).
    """

    d4: bool = True
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    gain: float = 0.2
    gamma: float = 0.2

    def __post_init__(self) -> None:
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(
                f"crop_scale must satisfy 0 < min <= max <= 1, got {low, high}"
            )
        low, high = self.crop_ratio
        if not 0 < low <= high:
            raise ValueError(f"crop_ratio must satisfy 0 < min <= max, got {low, high}")
        if not 0 <= self.gain < 1:
            raise ValueError(f"gain must be in [0, 1), got {self.gain}")
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")

    @property
    def crops(self) -> bool:
        return self.crop_scale != (1.0, 1.0) or self.crop_ratio != (1.0, 1.0)


def _quarter_turns_and_flips(image: jax.Array, rng: jax.Array) -> jax.Array:
    element = jax.random.randint(rng, (), 0, D4_ORDER)
    branches = [lambda x, k=k: d4_apply(x, k, axes=(0, 1)) for k in range(D4_ORDER)]
    return jax.lax.switch(element, branches, image)


def _resized_crop(
    image: jax.Array, rng: jax.Array, options: AugmentOptions
) -> jax.Array:
    """A random region of `[h, w, c]` `image`, resized bilinearly to `[h, w]`."""
    h, w = image.shape[:2]
    rng_area, rng_ratio, rng_y, rng_x = jax.random.split(rng, 4)
    area = jax.random.uniform(
        rng_area, minval=options.crop_scale[0], maxval=options.crop_scale[1]
    )
    ratio = jnp.exp(
        jax.random.uniform(
            rng_ratio,
            minval=math.log(options.crop_ratio[0]),
            maxval=math.log(options.crop_ratio[1]),
        )
    )
    crop_h = jnp.clip(h * jnp.sqrt(area / ratio), 1.0, h)
    crop_w = jnp.clip(w * jnp.sqrt(area * ratio), 1.0, w)
    top = jax.random.uniform(rng_y) * (h - crop_h)
    left = jax.random.uniform(rng_x) * (w - crop_w)
    # scale_and_translate maps input coordinate u to u * scale + translation,
    # so the region [top, top + crop_h) lands on [0, h).
    scale = jnp.stack([h / crop_h, w / crop_w])
    translation = -jnp.stack([top, left]) * scale
    return jax.image.scale_and_translate(
        image,
        image.shape,
        spatial_dims=(0, 1),
        scale=scale,
        translation=translation,
        method="linear",
        antialias=False,
    )


def _intensity_jitter(
    image: jax.Array, rng: jax.Array, options: AugmentOptions
) -> jax.Array:
    channels = image.shape[-1]
    rng_gain, rng_gamma = jax.random.split(rng)
    if options.gamma:
        low = jnp.min(image, axis=(0, 1))
        span = jnp.maximum(jnp.max(image, axis=(0, 1)) - low, 1e-6)
        exponent = jnp.exp(
            jax.random.uniform(
                rng_gamma, (channels,), minval=-options.gamma, maxval=options.gamma
            )
        )
        image = low + span * jnp.clip((image - low) / span, 0.0, 1.0) ** exponent
    if options.gain:
        image = image * jax.random.uniform(
            rng_gain, (channels,), minval=1 - options.gain, maxval=1 + options.gain
        )
    return image


def augment_batch(
    rng: jax.Array, images: jax.Array, options: AugmentOptions
) -> jax.Array:
    """One random view of every crop of a batch (jittable).

    Each image gets its own draw, from `split(rng, batch)[i]`: a random resized
    crop, then a quarter turn or flip, then the intensity jitter (each only if
    switched on in `options`).

    Args:
      rng: JAX key; the same key gives the same views.
      images: `[batch, h, h, c]` float square crops.
      options: what to perturb (`AugmentOptions`, static).

    Returns:
      `[batch, h, h, c]` float32 views.
    """
    if images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(
            f"expected square crops [batch, h, h, c], got shape {images.shape}"
        )

    def one(image: jax.Array, key: jax.Array) -> jax.Array:
        rng_crop, rng_d4, rng_intensity = jax.random.split(key, 3)
        if options.crops:
            image = _resized_crop(image, rng_crop, options)
        if options.d4:
            image = _quarter_turns_and_flips(image, rng_d4)
        if options.gain or options.gamma:
            image = _intensity_jitter(image, rng_intensity, options)
        return image

    keys = jax.random.split(rng, images.shape[0])
    return jax.vmap(one)(images.astype(jnp.float32), keys)


def augment_views(
    rng: jax.Array, images: jax.Array, options: AugmentOptions, num_views: int = 2
) -> jax.Array:
    """`num_views` independent views of a batch: `[num_views, batch, h, h, c]`,
    view v being `augment_batch(fold_in(rng, v), images, options)`."""
    return jnp.stack(
        [
            augment_batch(jax.random.fold_in(rng, v), images, options)
            for v in range(num_views)
        ]
    )


@dataclasses.dataclass(frozen=True)
class Objective:
    """The weights of SubCell's three tasks, and the settings they need. A
    weight of 0 switches its task off: its loss is neither computed nor
    reported (and the model builds no decoder or projector it would not use).

    Attributes:
      reconstruction_weight: masked-autoencoder reconstruction.
      nt_xent_weight: cell-specific NT-Xent between two views of a crop.
      supcon_weight: protein-specific supervised contrastive loss.
      mask_ratio: share of patches hidden from the encoder, in `[0, 1)`;
        must be > 0 with reconstruction (else nothing is masked to predict).
      temperature: the contrastive losses' temperature.
    """

    reconstruction_weight: float = 1.0
    nt_xent_weight: float = 1.0
    supcon_weight: float = 0.1
    mask_ratio: float = 0.25
    temperature: float = 0.1

    def __post_init__(self) -> None:
        weights = (self.reconstruction_weight, self.nt_xent_weight, self.supcon_weight)
        if min(weights) < 0 or max(weights) == 0:
            raise ValueError(
                "the objective's weights must be >= 0 and at least one > 0, got "
                f"reconstruction {weights[0]}, nt_xent {weights[1]}, "
                f"supcon {weights[2]}"
            )
        if not 0 <= self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.reconstruction_weight > 0 and self.mask_ratio == 0:
            raise ValueError(
                "reconstruction needs masked patches: set mask_ratio > 0 (SubCell: "
                "0.25) or reconstruction_weight=0"
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    @property
    def reconstructs(self) -> bool:
        return self.reconstruction_weight > 0

    @property
    def contrasts(self) -> bool:
        """Whether a contrastive task is on (then two views and a projector)."""
        return self.nt_xent_weight > 0 or self.supcon_weight > 0


# SubCell's released model (`subcell`), its MAE-only configuration (`mae`, mask
# ratio 0.5) and the protein-specific task alone (`protein`, nothing masked).
OBJECTIVES: Final[dict[str, Objective]] = {
    "mae": Objective(
        reconstruction_weight=1.0, nt_xent_weight=0.0, supcon_weight=0.0, mask_ratio=0.5
    ),
    "protein": Objective(
        reconstruction_weight=0.0, nt_xent_weight=0.0, supcon_weight=1.0, mask_ratio=0.0
    ),
    "subcell": Objective(),
}


def combine_objectives(
    objective: Objective,
    reconstruction_loss: jax.Array | None = None,
    projections: jax.Array | None = None,
    protein_ids: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """The active tasks' losses and their weighted sum.

    Args:
      objective: the weights (`Objective`, e.g. `OBJECTIVES["subcell"]`).
      reconstruction_loss: scalar, needed when reconstruction is on.
      projections: `[2, batch, d]` projections of two views, needed when a
        contrastive task is on.
      protein_ids: `[batch]` ids (class codes), needed with `supcon_weight`.

    Returns:
      `total_loss` and each active task's unweighted loss: `recon_loss`,
      `nt_xent_loss`, `supcon_loss`.
    """
    losses, total = {}, jnp.zeros((), jnp.float32)
    if objective.reconstructs:
        losses["recon_loss"] = reconstruction_loss
        total = total + objective.reconstruction_weight * reconstruction_loss
    if objective.nt_xent_weight:
        losses["nt_xent_loss"] = nt_xent_loss(
            projections[0], projections[1], objective.temperature
        )
        total = total + objective.nt_xent_weight * losses["nt_xent_loss"]
    if objective.supcon_weight:
        views, batch = projections.shape[:2]
        losses["supcon_loss"] = supervised_contrastive_loss(
            projections.reshape(views * batch, -1),
            jnp.tile(protein_ids, views),
            objective.temperature,
        )
        total = total + objective.supcon_weight * losses["supcon_loss"]
    return {"total_loss": total, **losses}
