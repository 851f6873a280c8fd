"""Albumentations 2.0.x pipelines for the data modules, and a seeded, worker-aware wrapper.

Albumentations 2.0 gives every ``A.Compose`` its own RNG; global seeding has no effect on it, and in 2.0.8 the RNG
is *not* reseeded inside DataLoader workers, so every worker would replay the same stream.
:class:`SeededTransform` fixes both: it seeds the pipeline from ``seed`` in the main process and, inside a worker,
from ``(seed, worker seed)``, where the worker seed is derived by PyTorch from the loader's generator.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
from torch.utils.data import get_worker_info

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SeededTransform",
    "folder_eval_transform",
    "folder_train_transform",
    "medical_eval_transform",
    "medical_train_transform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def medical_train_transform(img_size: int) -> A.Compose:
    """The reference ``RandomGenerator`` (TransUNet/EMCAD/LoMix) for Synapse and ACDC slices.

    With probability 0.5 a ``rot90`` by ``k`` in {0, 1, 2, 3} followed by a mandatory horizontal or vertical flip;
    otherwise, with probability 0.5 (0.25 overall), a rotation by a uniform angle in [-20, 20] degrees (image
    bilinear, label nearest, zero fill); otherwise nothing. Then a resize to ``img_size`` (image bicubic, label
    nearest). The reference draws an integer angle in [-20, 19], uses nearest neighbour for the image as well, and
    resizes with ``scipy.ndimage.zoom(order=3)``.

    Args:
        img_size: Output side length.

    Returns:
        The (unseeded) pipeline; wrap it in :class:`SeededTransform`.

    Example:
        >>> t = SeededTransform(medical_train_transform(32), seed=0)
        >>> image, mask = t(np.zeros((40, 40), np.float32), np.zeros((40, 40), np.uint8))
        >>> image.shape, mask.shape
        ((32, 32), (32, 32))
    """
    rot_flip = A.Sequential(
        [A.RandomRotate90(p=1.0), A.OneOf([A.HorizontalFlip(p=1.0), A.VerticalFlip(p=1.0)], p=1.0)],
        p=2 / 3,  # OneOf weight: 0.75 * 2/3 = 0.5 overall
    )
    rotate = _rotate(20, p=1 / 3)  # OneOf weight: 0.75 * 1/3 = 0.25 overall
    return A.Compose(
        [
            A.OneOf([rot_flip, rotate], p=0.75),
            A.Resize(img_size, img_size, interpolation=cv2.INTER_CUBIC, mask_interpolation=cv2.INTER_NEAREST),
        ],
        strict=True,
    )


def medical_eval_transform(img_size: int) -> A.Compose:
    """Resize only (image bicubic, label nearest), used for validation slices.

    Args:
        img_size: Output side length.

    Returns:
        The pipeline.

    Example:
        >>> t = SeededTransform(medical_eval_transform(16), seed=0)
        >>> t(np.ones((8, 8), np.float32), np.ones((8, 8), np.uint8))[1].shape
        (16, 16)
    """
    return A.Compose(
        [A.Resize(img_size, img_size, interpolation=cv2.INTER_CUBIC, mask_interpolation=cv2.INTER_NEAREST)],
        strict=True,
    )


def folder_train_transform(img_size: int, augment: bool = True) -> A.Compose:
    """Binary 2-D pipeline (polyp, skin lesion, breast ultrasound).

    Resize to ``img_size`` (image bilinear, mask nearest) first, so that augmenting large originals stays cheap;
    then, when ``augment``, a rotation by a uniform angle in [-90, 90] degrees (always applied, zero fill, as
    torchvision ``RandomRotation(90)`` in the reference) and independent horizontal and vertical flips (p 0.5 each);
    finally ImageNet normalisation.

    Args:
        img_size: Output side length.
        augment: Apply the rotation and flips.

    Returns:
        The pipeline.

    Example:
        >>> t = SeededTransform(folder_train_transform(32), seed=0)
        >>> image, mask = t(np.zeros((50, 40, 3), np.uint8), np.zeros((50, 40), np.uint8))
        >>> image.shape, image.dtype, mask.shape
        ((32, 32, 3), dtype('float32'), (32, 32))
    """
    steps: list = [A.Resize(img_size, img_size, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST)]
    if augment:
        steps += [
            _rotate(90, p=1.0),
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
        ]
    steps.append(A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD, max_pixel_value=255.0))
    return A.Compose(steps, strict=True)


def folder_eval_transform(img_size: int) -> A.Compose:
    """Resize (image bilinear, mask nearest) and ImageNet normalisation.

    Args:
        img_size: Output side length.

    Returns:
        The pipeline.

    Example:
        >>> folder_eval_transform(32)(image=np.zeros((8, 8, 3), np.uint8))["image"].shape
        (32, 32, 3)
    """
    return folder_train_transform(img_size, augment=False)


class SeededTransform:
    """Call an albumentations pipeline on an ``(image, mask)`` pair with a reproducible, per-worker RNG.

    Args:
        transform: The pipeline.
        seed: Seed of the main-process stream; worker ``w`` uses ``(seed, torch worker seed of w)``.

    Example:
        >>> t = SeededTransform(medical_train_transform(8), seed=1)
        >>> u = SeededTransform(medical_train_transform(8), seed=1)
        >>> x = np.random.default_rng(0).random((8, 8)).astype(np.float32)
        >>> m = (x > 0.5).astype(np.uint8)
        >>> all(np.array_equal(t(x, m)[0], u(x, m)[0]) for _ in range(5))
        True
    """

    def __init__(self, transform: A.Compose, seed: int) -> None:
        self.transform = transform
        self.seed = int(seed)
        self._stream: int | None = None  # worker seed the RNG was last set for (None = main process)
        self.transform.set_random_seed(self.seed)

    def _maybe_reseed(self) -> None:
        info = get_worker_info()
        stream = None if info is None else int(info.seed)
        if stream != self._stream:
            self._stream = stream
            seed = (
                self.seed if stream is None else int(np.random.SeedSequence((self.seed, stream)).generate_state(1)[0])
            )
            self.transform.set_random_seed(seed)

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Transform one pair; returns ``(image, mask)``."""
        self._maybe_reseed()
        out = self.transform(image=image, mask=mask)
        return out["image"], out["mask"]


def _rotate(degrees: float, p: float) -> A.Rotate:
    """A rotation by up to ``degrees`` either way: bilinear image, nearest-neighbour mask, zero-filled corners."""
    return A.Rotate(
        limit=(-degrees, degrees),
        interpolation=cv2.INTER_LINEAR,
        mask_interpolation=cv2.INTER_NEAREST,
        border_mode=cv2.BORDER_CONSTANT,
        fill=0,
        fill_mask=0,
        p=p,
    )
