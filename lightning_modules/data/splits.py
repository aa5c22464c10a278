"""Stratified, seeded splits that are identical on every run and every machine.

``numpy.random.RandomState`` is used on purpose: NumPy freezes its stream (NEP 19), while ``Generator`` and
``torch.randperm`` streams may change between releases, and a validation split that silently moved would
make studies run on different library versions incomparable.
"""

from __future__ import annotations

import numpy as np

from lightning_modules.data.errors import DataError

__all__ = [
    "CARVED_TEST_FROM",
    "REPORT_SPLIT",
    "SELECTION_SPLIT",
    "TEST_FRACTION",
    "TEST_SPLIT_SEED",
    "split_count",
    "split_indices",
    "stratified_split",
]

# The split pruning and the objective read, and the split that is only reported, never used to select.
SELECTION_SPLIT = "val"
REPORT_SPLIT = "test"

# Datasets without a test split (digits, an ImageFolder tree without test/) get this fixed one, independent
# of ``split_seed``, so every study on the same data reports on the same test images.
TEST_FRACTION = 0.2
TEST_SPLIT_SEED = 0
CARVED_TEST_FROM = f"carved from the training data: {TEST_FRACTION:.0%} stratified, seed {TEST_SPLIT_SEED}"


def split_count(size: float | int, total: int, what: str) -> int:
    """Images in a split of ``size`` (fraction or count) out of ``total``; at least one stays on each side."""
    count = round(size * total) if isinstance(size, float) else int(size)
    count = max(count, 1)
    if count >= total:
        raise DataError(
            f"{what}: cannot hold out {count} of {total} images and keep any for training; "
            f"use a smaller val_size (a fraction in (0, 1) or a count below {total})"
        )
    return count


def stratified_split(labels: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices ``0..len(labels)-1`` into (kept, held_out) with ``count`` held out, per-class
    proportional (largest remainder), chosen with ``seed``. Both index arrays are sorted.
    """
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * (count / len(labels))
    take = np.floor(quota).astype(np.int64)
    short = count - int(take.sum())
    if short > 0:
        # Largest remainders first; ties broken by the seeded RNG, not by class order.
        remainder = quota - take
        order = np.lexsort((rng.random_sample(len(classes)), -remainder))
        take[order[:short]] += 1
    held: list[np.ndarray] = []
    for cls, k in zip(classes, take, strict=True):
        members = np.flatnonzero(labels == cls)
        held.append(members[rng.permutation(len(members))[:k]])
    held_out = np.sort(np.concatenate(held)) if held else np.empty(0, np.int64)
    mask = np.ones(len(labels), bool)
    mask[held_out] = False
    return np.flatnonzero(mask), held_out


def split_indices(labels: np.ndarray, val_size: float | int, split_seed: int, test_count: int | None,
                  what: str) -> tuple[dict[str, np.ndarray], str]:
    """The train, val and test indices of a dataset whose training labels are ``labels`` and which has a
    test set of ``test_count`` images (``None``: none, so ``TEST_FRACTION`` of the training data is carved
    off as test first, with ``TEST_SPLIT_SEED``), and where the test indices point: ``"the source's test
    set"`` or ``CARVED_TEST_FROM``. Validation is ``val_size`` of what is left, stratified, ``split_seed``."""
    if test_count is None:
        n_test = split_count(TEST_FRACTION, len(labels), f"{what} test split")
        pool, test = stratified_split(labels, n_test, TEST_SPLIT_SEED)
        test_from = CARVED_TEST_FROM
    else:
        pool, test = np.arange(len(labels)), np.arange(test_count)
        test_from = "the source's test set"
    n_val = split_count(val_size, len(pool), f"{what} val_size")
    train, val = stratified_split(labels[pool], n_val, split_seed)
    return {"train": pool[train], "val": pool[val], "test": test}, test_from
