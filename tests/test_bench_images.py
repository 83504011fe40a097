"""The one-class digits protocol of benchmarks/images.py."""

import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import images as bench


def test_one_class_split_trains_on_one_digit_of_the_pool_and_tests_on_the_rest():
    digits = load_digits()
    train, test, anomalous = bench.one_class_split(digits.images, digits.target, 3)
    order = np.random.default_rng(3).permutation(len(digits.images))
    pool = order[: int(0.7 * len(order))]
    assert len(test) == len(digits.images) - len(pool) == len(anomalous)
    assert len(train) == int((digits.target[pool] == 3).sum())
    np.testing.assert_array_equal(test, digits.images[order[len(pool) :]])
    np.testing.assert_array_equal(anomalous, (digits.target[order[len(pool) :]] != 3).astype(int))
    assert 0.85 < anomalous.mean() < 0.95


def test_upscaled_digits_are_uint8_images_of_the_same_strokes():
    digits = load_digits().images[:5]
    big = bench.upscale(digits, 32)
    assert big.shape == (5, 32, 32) and big.dtype == np.uint8 and big.max() > 200
    shrunk = big.reshape(5, 8, 4, 8, 4).mean(axis=(2, 4)) * 16 / 255
    assert np.corrcoef(shrunk.ravel(), digits.ravel())[0, 1] > 0.95
