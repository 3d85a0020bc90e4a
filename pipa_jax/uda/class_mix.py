"""ClassMix masks and mixing (DACS; docs/method.md §3.6), with static shapes.

Official behaviour, two variants:
- DAFormer / HRDA / MIC / PiPa (``get_class_masks`` in ``dacs_transforms.py``): for each image i
  the candidate classes are ``unique(labels)`` of the WHOLE source batch (the loop variable is
  not used for it), ``ceil(n/2)`` of them are drawn uniformly without replacement, independently
  per image, and ``M_i = [y_s,i in chosen_i]``. A chosen class may be absent from image i.
  This is the default here (``per_image_classes=False``).
- Original DACS (``trainUDA.py``): the candidates are ``unique(labels[i])`` of image i only
  (``per_image_classes=True``).
In both, the ignore id 255 is a candidate like any class (an official quirk; switch it off with
``include_ignore=False``). Pasted 255 pixels keep label 255, so they are ignored by the loss.

Static-shape formulation: presence over ``num_classes + 1`` slots (slot ``num_classes`` is the
ignore id; any label outside ``[0, num_classes)`` falls there), one uniform random priority per
(image, slot), and the chosen set is the ``k = ceil(n/2)`` present slots of lowest priority,
which is a uniformly random k-subset.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pipa_jax.labels import NUM_CLASSES


def _slots(labels, num_classes: int):
    labels = jnp.asarray(labels)
    in_range = (labels >= 0) & (labels < num_classes)
    return jnp.where(in_range, labels, num_classes).astype(jnp.int32)


def class_mix_choice(
    key,
    labels,
    *,
    num_classes: int = NUM_CLASSES,
    include_ignore: bool = True,
    per_image_classes: bool = False,
):
    """The classes ClassMix pastes, per image.

    Args:
      key: a JAX PRNG key.
      labels: [B, H, W] integer source labels (train ids, 255 = ignore).
      num_classes: number of real classes; slot ``num_classes`` stands for the ignore id.
      include_ignore: whether 255 counts as a candidate class (official: yes).
      per_image_classes: False = candidates from the whole batch (DAFormer/PiPa),
        True = from image i only (original DACS).

    Returns:
      [B, num_classes + 1] bool, True for the chosen slots of each image.
    """
    labels = jnp.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be [B, H, W], got shape {labels.shape}")
    batch = labels.shape[0]
    slots = _slots(labels, num_classes)
    slot_ids = jnp.arange(num_classes + 1, dtype=jnp.int32)
    # [B, S]: which slots occur in each image (compare-and-reduce: no scatter, fuses on TPU).
    present = jnp.any(slots[..., None] == slot_ids, axis=(1, 2))
    if not per_image_classes:
        present = jnp.broadcast_to(jnp.any(present, axis=0, keepdims=True), present.shape)
    if not include_ignore:
        present = present.at[:, num_classes].set(False)
    num_present = jnp.sum(present, axis=1, dtype=jnp.int32)
    num_chosen = (num_present + 1) // 2  # ceil(n / 2), as int((n + n % 2) / 2) officially
    priority = jax.random.uniform(key, (batch, num_classes + 1))
    priority = jnp.where(present, priority, 2.0)  # absent slots sort last
    rank = jnp.argsort(jnp.argsort(priority, axis=1), axis=1)
    return present & (rank < num_chosen[:, None])


def class_mix_masks(
    key,
    labels,
    *,
    num_classes: int = NUM_CLASSES,
    include_ignore: bool = True,
    per_image_classes: bool = False,
):
    """ClassMix masks: [B, H, W] bool, True where image i's source pixel is pasted.

    See :func:`class_mix_choice` for the arguments and the official behaviour.
    """
    chosen = class_mix_choice(
        key,
        labels,
        num_classes=num_classes,
        include_ignore=include_ignore,
        per_image_classes=per_image_classes,
    )
    return mask_from_choice(chosen, labels, num_classes=num_classes)


def mask_from_choice(chosen, labels, *, num_classes: int = NUM_CLASSES):
    """[B, H, W] bool: ``labels[i]`` lies in image i's chosen slots ([B, num_classes + 1])."""
    slots = _slots(labels, num_classes)
    slot_ids = jnp.arange(num_classes + 1, dtype=jnp.int32)
    return jnp.any((slots[..., None] == slot_ids) & chosen[:, None, None, :], axis=-1)


def mix(mask, a, b):
    """``where(mask, a, b)``: the source ``a`` where the mask is True, the target ``b`` elsewhere.

    Args:
      mask: [B, H, W] bool.
      a, b: [B, H, W, ...] arrays (images, labels, weights); the mask broadcasts over trailing
        dimensions.
    """
    mask = jnp.asarray(mask, bool)
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    ndim = max(a.ndim, b.ndim)
    mask = mask.reshape(mask.shape + (1,) * (ndim - mask.ndim))
    return jnp.where(mask, a, b)
