"""flow_io: atomic writes, PNGs, the architecture record inside a weights file."""
import os

import keras
import numpy as np
import pytest

from flowkit.files import atomic_write, read_config, save_png, save_weights_atomic


def _model():
    inp = keras.Input((3,))
    return keras.Model(inp, keras.layers.Dense(2)(inp))


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "best.weights.h5")
    m = _model()
    save_weights_atomic(m, path)
    before = open(path, "rb").read()

    def broken(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, broken)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["best.weights.h5"]  # no temp file left behind
    m2 = _model()
    m2.load_weights(path)
    np.testing.assert_array_equal(m2.get_weights()[0], m.get_weights()[0])


def test_save_png_roundtrip(tmp_path):
    import imageio.v2 as imageio

    img = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
    path = str(tmp_path / "g.png")
    save_png(path, img)
    assert np.array_equal(imageio.imread(path), img)
    assert os.listdir(tmp_path) == ["g.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


def test_architecture_record_travels_inside_the_weights_file(tmp_path):
    path = str(tmp_path / "m.weights.h5")
    m = _model()
    save_weights_atomic(m, path, {"model": "nice", "hidden": 8})
    assert read_config(path) == {"model": "nice", "hidden": 8}
    m2 = _model()
    m2.load_weights(path)  # Keras ignores the record
    np.testing.assert_array_equal(m2.get_weights()[0], m.get_weights()[0])
    save_weights_atomic(m, path)
    assert read_config(path) is None
    (tmp_path / "junk.weights.h5").write_bytes(b"not hdf5")
    assert read_config(str(tmp_path / "junk.weights.h5")) is None
