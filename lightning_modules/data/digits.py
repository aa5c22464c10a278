"""``digits``: scikit-learn's bundled handwritten digits, the offline dataset for quick runs and tests.

1,797 grayscale 8x8 images with values 0..16 (UCI optdigits test set), shipped inside scikit-learn, so a
study runs with no network and no files. Values are scaled to 0..255 and upsampled (bilinear) to 16x16 by
default so a CIFAR-style network still has spatial extent to downsample twice. There is no test split: a
fixed stratified 20% is carved (seed 0), then the validation split from the rest. Training augmentation is
random crops only: mirrored digits are not digits.
"""

from __future__ import annotations

import numpy as np

from lightning_modules.data.base import ArrayDataModule, SourceArrays, resize_uint8
from lightning_modules.data.registry import DATASETS

__all__ = ["DIGITS_IMAGE_SIZE", "DigitsDataModule"]

DIGITS_IMAGE_SIZE = 16


@DATASETS.register("digits")
class DigitsDataModule(ArrayDataModule):
    """scikit-learn digits on the fast path: in_channels 1, 10 classes, ``image_size`` default 16."""

    name = "digits"
    hflip = False  # a mirrored 2, 3, 4, 7 or 9 is not that digit; crops alone are label-safe

    def _load(self) -> SourceArrays:
        # Imported here, not with the module: scikit-learn (and the pandas it imports) takes over a second,
        # paid otherwise by every process that imports the datasets, whatever data its study trains on.
        import sklearn
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
        images = resize_uint8(images, self.cfg.image_size or DIGITS_IMAGE_SIZE)
        return SourceArrays(
            train_images=images,
            train_labels=bunch.target.astype(np.int64),
            test_images=None,
            test_labels=None,
            classes=tuple(str(c) for c in range(10)),
            source=f"sklearn.datasets.load_digits (scikit-learn {sklearn.__version__}, bundled, offline)",
        )
