"""flow_density: bits/dim, its epoch-log callback, dequantization of integer pixels."""
import math

import keras
import numpy as np
import pytest

from flowkit.density import BitsPerDim, bits_per_dim, dequantize, dequantized


def test_bits_per_dim_of_uniform_density_is_eight():
    # The uniform density on [0,1]^D has NLL 0 nats; with 256 bins per dim that is exactly 8 bits/dim.
    assert bits_per_dim(0.0, 784, 1 / 256) == pytest.approx(8.0)
    # [-1,1] data: uniform density 2^-D, NLL = D ln 2; bins of width 2/256 -> 8 bits/dim again.
    assert bits_per_dim(10 * math.log(2), 10, 2 / 256) == pytest.approx(8.0)


def test_bits_per_dim_callback_adds_keys():
    cb = BitsPerDim(dims=4, bin_width=1 / 256)
    logs = {"val_loss": 1.5}
    cb.on_epoch_end(0, logs)
    assert logs["val_bpd"] == pytest.approx(bits_per_dim(1.5, 4, 1 / 256))


def test_dequantize_stays_in_the_pixel_bin():
    k = np.arange(256).repeat(50)
    np.random.seed(0)
    x = dequantize(k, low=-1.0, width=2 / 256)
    assert x.dtype == np.float32
    lo = -1 + k * 2 / 256
    assert np.all(x >= lo - 1e-6) and np.all(x <= lo + 2 / 256 + 1e-6)
    assert np.ptp(x - lo) > 1 / 256  # noise spans the bin, not a constant offset


def test_dequantized_dataset_draws_fresh_noise_each_pass():
    keras.utils.set_random_seed(0)  # a global seed must not make each pass repeat its noise
    k = np.random.RandomState(0).randint(0, 256, (32, 10))
    ds = dequantized(k, 16, 0, 1 / 256)
    first, second = (np.concatenate([np.asarray(x) for x, _ in ds]) for _ in range(2))
    for x in (first, second):
        assert np.all(x >= k / 256) and np.all(x <= (k + 1) / 256)
    assert not np.allclose(first, second)
