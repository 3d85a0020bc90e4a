"""The one place for dataset facts: class names, label-id maps, palettes, class subsets and the
image normalisation constants (docs/method.md §8-9). Everything else imports from here.
"""
import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = 255
NUM_CLASSES = 19

CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)

# Cityscapes palette in train-id order.
PALETTE = np.array(
    [
        (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
        (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
        (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
        (0, 80, 100), (0, 0, 230), (119, 11, 32),
    ],
    dtype=np.uint8,
)

# Cityscapes / GTA5 label id -> train id; every other id is ignored.
CITYSCAPES_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
    25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
# SYNTHIA-RAND-CITYSCAPES label id -> train id (0, 13, 14, 22 and anything else ignored).
SYNTHIA_ID_TO_TRAIN_ID = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11, 17: 12,
    8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18,
}

# "Thing" classes for the ImageNet feature distance (docs/method.md §3.4).
THING_CLASSES = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)

# SYNTHIA->Cityscapes reports mIoU over 16 and 13 classes.
SYNTHIA_16_CLASSES = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
SYNTHIA_13_CLASSES = tuple(c for c in SYNTHIA_16_CLASSES if c not in (3, 4, 5))

# ImageNet normalisation on RGB 0..255 (mmseg img_norm_cfg).
IMAGE_MEAN = np.array((123.675, 116.28, 103.53), dtype=np.float32)
IMAGE_STD = np.array((58.395, 57.12, 57.375), dtype=np.float32)


def normalize(images):
    """uint8 (or float 0..255) RGB [..., 3] -> float32 normalised with IMAGE_MEAN / IMAGE_STD, on
    device (the train step, the teacher and the evaluator all normalise here)."""
    return (jnp.asarray(images).astype(jnp.float32) - jnp.asarray(IMAGE_MEAN)) / jnp.asarray(IMAGE_STD)


def lookup_table(id_to_train_id: dict[int, int], size: int = 1 << 16) -> np.ndarray:
    """A [size] uint8 table mapping raw label ids to train ids (255 where unmapped)."""
    table = np.full((size,), IGNORE_INDEX, dtype=np.uint8)
    for raw, train in id_to_train_id.items():
        table[raw] = train
    return table


def to_train_ids(labels: np.ndarray, id_to_train_id: dict[int, int]) -> np.ndarray:
    """Maps an integer label array of raw ids to uint8 train ids (255 for unmapped ids)."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise ValueError(f"label ids must be integers, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= (1 << 16)):
        raise ValueError(
            f"label ids must lie in [0, 65535], got range [{labels.min()}, {labels.max()}]"
        )
    return lookup_table(id_to_train_id)[labels]


def colorize(train_ids: np.ndarray) -> np.ndarray:
    """[H, W] train ids -> [H, W, 3] uint8 Cityscapes colours (ignored pixels black)."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:NUM_CLASSES] = PALETTE
    return table[np.asarray(train_ids, dtype=np.uint8)]
