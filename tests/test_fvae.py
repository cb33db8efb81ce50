"""f-VAEs: the flow's log-det against the autodiff Jacobian, the bounds (−ELBO ≥ IW bound, the IW
bound falling with K), the loss Keras computes against an independent Monte-Carlo ELBO with the same
noise, the per-image −ELBO model against the compiled loss, shapes, save/load, training, and the
script on MNIST and on an image folder."""
import math
import os
import re
import subprocess
import sys

import imageio.v2 as imageio
import keras
import numpy as np
import pytest

import forkrun
import fvae
from flowkit.density import NormalNLL
from flow_layers import initialize_actnorms
from flowkit.sample import sample
from helpers import jacobian_log_det, mnist_npz, perturb, reported_log_det

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(squeezes=1, blocks=1, width=8, level=2, depth=1, hidden=8)
np_ = keras.ops.convert_to_numpy


def small_digits(digits, n, size=8):
    """n real digits as [−1, 1] images (n, size, size, 1), dequantized with seeded noise: the 28×28
    digits padded to 32 and subsampled."""
    k = np.pad(digits[:n], ((0, 0), (2, 2), (2, 2)))[:, ::32 // size, ::32 // size, None].astype("float64")
    return (-1 + (k + np.random.RandomState(0).uniform(size=k.shape)) * fvae.BIN).astype(keras.config.floatx())


def tiny_fvae(x, seed=0, **kw):
    """A tiny f-VAE on x, its Actnorms initialised and every weight nudged (the zero-initialised convs act)."""
    keras.utils.set_random_seed(seed)
    f = fvae.build_fvae(x.shape[1], x.shape[-1], **{**TINY, **kw})
    u = np.random.RandomState(seed).standard_normal((len(x), f.latent_dims)).astype(x.dtype)
    initialize_actnorms(f.model, [x, u])
    perturb(f.model, seed=seed)
    return f


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_normal_nll_passes_x_and_adds_the_gaussian_term(sign):
    x = np.random.RandomState(0).standard_normal((3, 2, 2, 5)).astype("float32")
    layer = NormalNLL.from_config(NormalNLL(sign=sign).get_config())
    np.testing.assert_array_equal(layer(x), x)
    want = sign * np.mean(0.5 * np.sum(x.reshape(3, -1) ** 2, 1) + 0.5 * 20 * math.log(2 * math.pi))
    np.testing.assert_allclose(float(layer.losses[0]), want, rtol=1e-6)


def test_flow_log_det_equals_brute_force_jacobian(digits, float64):
    x = small_digits(digits, 4)  # latent 4×4×4: d = 64
    f = tiny_fvae(x)
    z = np_(f.encoder_net(x)) + np.random.RandomState(1).standard_normal((4, 4, 4, 4)) * 0.5
    f.flow(z)
    reported = reported_log_det(f.flow)
    brute = jacobian_log_det(f.flow, z)
    assert abs(np.mean(brute)) > 0.1  # the flow is not volume preserving: the check can fail
    np.testing.assert_allclose(reported, np.mean(brute), rtol=1e-7, atol=1e-7)


def test_keras_loss_equals_an_independent_monte_carlo_elbo(digits, float64):
    x = small_digits(digits, 5)
    f = tiny_fvae(x, seed=2)
    fvae.compile_fvae(f)
    u = np.random.RandomState(3).standard_normal((5, f.latent_dims))
    keras_loss = f.model.evaluate([x, u], np.zeros(5), batch_size=5, verbose=0)

    # the ELBO term by term, from the parts and the flow's autodiff Jacobian
    d, big_d = f.latent_dims, x[0].size
    log_scales = [np_(f.model.get_layer(name).log_scale)[0] for name in ("posterior_scale", "pixel_scale")]
    sigma, sigma_x = np.exp(log_scales[0]), np.exp(-log_scales[1])  # the Scales multiply u by σ, r by 1/σ_x
    z = np_(f.encoder_net(x, training=False)) + (sigma * u).reshape(-1, 4, 4, 4)
    eps = np_(f.flow(z))
    log_det = jacobian_log_det(f.flow, z)
    mean_x = np_(f.generator(z, training=False)).reshape(5, -1)
    log_2pi = math.log(2 * math.pi)
    rec = (0.5 * np.sum(((x.reshape(5, -1) - mean_x) / sigma_x) ** 2, 1) + np.sum(np.log(sigma_x))
           + 0.5 * big_d * log_2pi)
    prior = 0.5 * np.sum(eps ** 2, 1) + 0.5 * d * log_2pi - log_det
    log_q = -0.5 * np.sum(u ** 2, 1) - 0.5 * d * log_2pi - np.sum(np.log(sigma))
    elbo_terms = rec + prior + log_q
    np.testing.assert_allclose(keras_loss, np.mean(elbo_terms), rtol=1e-9)
    # and per image, as the IW bound reads them
    np.testing.assert_allclose(f.elbo.predict([x, u], verbose=0), elbo_terms, rtol=1e-9)


def test_per_image_elbo_averages_to_the_compiled_loss(digits):
    """The `elbo` model (log-dets per example) against the trained model's loss (batch means through
    add_loss), in float32 on one batch: the two paths agree to rounding."""
    x = small_digits(digits, 8)
    f = tiny_fvae(x, seed=10)
    fvae.compile_fvae(f)
    u = np.random.RandomState(11).standard_normal((8, f.latent_dims)).astype("float32")
    per_image = f.elbo.predict([x, u], verbose=0)
    assert per_image.shape == (8,) and np.ptp(per_image) > 1  # one figure per image, not a batch mean
    keras_loss = f.model.evaluate([x, u], np.zeros(8), batch_size=8, verbose=0)
    np.testing.assert_allclose(np.mean(per_image), keras_loss, rtol=1e-5)


def test_elbo_bounds_the_iw_bound_which_falls_with_k(digits):
    x = small_digits(digits, 6)
    f = tiny_fvae(x, seed=4)
    rng = np.random.RandomState(5)
    losses = np.stack([f.elbo.predict_on_batch([x, rng.standard_normal((6, f.latent_dims)).astype("float32")])
                       for _ in range(256)], axis=1).astype(np.float64)  # (images, 256 samples)

    def iw(k):  # the K-sample bound, averaged over the 256/K disjoint groups of samples
        groups = losses.reshape(6, -1, k)
        return np.mean(-(np.logaddexp.reduce(-groups, axis=2) - np.log(k)))

    bounds = [iw(k) for k in (1, 4, 16, 64)]
    assert bounds[0] == pytest.approx(np.mean(losses))           # K = 1 is the −ELBO
    assert all(a > b for a, b in zip(bounds, bounds[1:])), bounds  # tighter with every K
    elbo, iw64 = fvae.iw_bound(f.elbo, x, 64, seed=6)
    assert elbo >= iw64 and elbo - iw64 > 0.1


@pytest.mark.parametrize("size, channels, squeezes, level", [(16, 1, 2, 1), (8, 3, 1, 2)])
def test_decoder_shapes(size, channels, squeezes, level):
    keras.utils.set_random_seed(0)
    f = fvae.build_fvae(size, channels, squeezes=squeezes, blocks=1, width=8, level=level, depth=1, hidden=8)
    side = size // 2 ** squeezes
    assert f.latent_dims == size * size * channels == f.dims
    assert f.generator.input.shape[1:] == (side, side, channels * 4 ** squeezes)
    assert f.model.output.shape[1:] == (f.latent_dims + f.dims,)  # [ε, r]
    x = sample(f.sampler, 5, 1.0, seed=0)
    assert x.shape == (5, size, size, channels)
    assert np.all(np.abs(x) < 1)  # tanh


def test_save_load_gives_the_same_samples(digits, tmp_path):
    x = small_digits(digits, 4)
    f = tiny_fvae(x, seed=7)
    path = str(tmp_path / "f.weights.h5")
    f.model.save_weights(path)
    keras.utils.set_random_seed(8)  # another random permutation and init: the file must restore them
    g = fvae.build_fvae(8, 1, **TINY)
    assert not np.array_equal(sample(f.sampler, 4, 1.0, seed=3), sample(g.sampler, 4, 1.0, seed=3))
    g.model.load_weights(path)
    np.testing.assert_array_equal(sample(f.sampler, 4, 0.8, seed=3), sample(g.sampler, 4, 0.8, seed=3))


def test_short_training_lowers_the_loss(digits):
    x = small_digits(digits, 128, size=16)
    keras.utils.set_random_seed(9)
    f = fvae.build_fvae(16, 1, squeezes=2, blocks=1, width=16, level=1, depth=2, hidden=16)
    u = np.random.RandomState(9).standard_normal((128, f.latent_dims)).astype("float32")
    initialize_actnorms(f.model, [x[:64], u[:64]])
    fvae.compile_fvae(f, lr=2e-3)
    y = np.zeros(128)
    before = f.model.evaluate([x, u], y, verbose=0)
    f.model.fit([x, u], y, batch_size=32, epochs=4, verbose=0)
    after = f.model.evaluate([x, u], y, verbose=0)
    assert after < before - 100, (before, after)  # nats per image (D = 256)


def run_script(*args, cwd):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    return forkrun.run([sys.executable, os.path.join(ROOT, "fvae.py"), *args], cwd=cwd, env=env, timeout=600)


FAST = ["--squeezes", "2", "--blocks", "1", "--width", "8", "--level", "1", "--depth", "1", "--hidden", "8",
        "--batch-size", "16", "--steps-per-epoch", "3"]


@pytest.mark.slow  # a subprocess: ~45 s on 2 busy cores
def test_tiny_run_on_mnist_then_the_experiments(digits, tmp_path):
    data = mnist_npz(tmp_path / "mnist.npz", digits, 64, 16)
    done = run_script("--data", data, *FAST, "--epochs", "1", "--iw", "4", "--iw-images", "8",
                      "--out", "pics", "--weights", "f.weights.h5", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert re.fullmatch(r"test bits/dim \(ELBO bound\): \d+\.\d{3}", lines[-1])
    elbo, iw = map(float, re.search(r"ELBO bound (\S+), IW bound (\S+) bits/dim", done.stdout).groups())
    assert elbo >= iw
    for t in ("1", "0.8"):
        assert imageio.imread(tmp_path / "pics" / f"fvae_epoch_001_T{t}.png").shape == (9 * 32, 9 * 32)
    # the experiments read the architecture from the weights' record: no shape flags
    assert fvae.main(["--data", data, "--weights", str(tmp_path / "f.weights.h5"), "--out", str(tmp_path / "x"),
                      "--reconstruct", "--interpolate", "1", "--sample-only", "--std", "0.5", "--iw", "2",
                      "--iw-images", "4"]) == 0
    assert imageio.imread(tmp_path / "x" / "fvae_reconstruct.png").shape == (2 * 32, 8 * 32)
    assert imageio.imread(tmp_path / "x" / "fvae_interpolate.png").shape == (2 * 32, 9 * 32)
    assert os.path.isfile(tmp_path / "x" / "fvae_samples_T0.5.png")


def test_tiny_run_on_an_image_folder(tmp_path, capsys):
    rng = np.random.RandomState(0)
    for i in range(16):  # the fewest a folder may hold: 8 held out, 8 to train on
        imageio.imwrite(tmp_path / f"im{i}.png", rng.randint(0, 256, (20, 24, 3)).astype(np.uint8))
    code = fvae.main(["--data", str(tmp_path), "--img-size", "16", *FAST, "--epochs", "1",
                      "--batch-size", "4", "--out", str(tmp_path / "pics"),
                      "--weights", str(tmp_path / "f.weights.h5")])
    assert code == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("test bits/dim (ELBO bound): ")
    assert imageio.imread(tmp_path / "pics" / "fvae_samples_T1.png").shape == (9 * 16, 9 * 16, 3)


@pytest.mark.parametrize("argv, says", [
    (["--img-size", "24"], "multiple of 16"),
    (["--data", "nowhere"], "no such folder or file"),
    (["--level", "0"], "must be positive"),
    (["--reconstruct"], "no such file"),
    (["--squeezes", "2", "--level", "3", "--img-size", "16"], "multiple of 32"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, says):
    out = tmp_path / "out"
    folder = tmp_path / "imgs"
    folder.mkdir()
    extra = ["--data", str(folder)] if "--img-size" in argv else []
    code = fvae.main([*extra, *argv, "--out", str(out), "--weights", str(tmp_path / "w.weights.h5")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:") and says in err[0], err
    assert not out.exists() and not (tmp_path / "w.weights.h5").exists()
