"""iresnet.py and its layers (SpectralDense, SpectralConv2D, ResidualFlow): the Lipschitz bound, the
fixed-point inverse, the log-det estimators against the brute-force Jacobian, the whole model, its
command line. Small shapes, float64 where a Jacobian is compared; fixed seeds throughout."""
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

import forkrun
import iresnet
from flowkit import backend
from flowkit.density import dequantize, prior_nll
from flowkit.files import UserError, save_weights_atomic
from flow_layers import LipSwish, Logit, MultiScale, ResidualFlow, SpectralConv2D, SpectralDense, banach_iterations, initialize_actnorms
from helpers import jacobian_log_det, mnist_npz, perturb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(stages=2, blocks=1, width=8)
np_, tensor = keras.ops.convert_to_numpy, keras.ops.convert_to_tensor


def activation(name):
    return keras.layers.Activation("elu") if name == "elu" else LipSwish()


def scaled(g, scale, seed):
    """g with its weights times `scale`, its kernels drawn anew from NumPy (Glorot-uniform, seeded): the
    same g on every backend (Keras' initializers draw from each backend's own generator)."""
    rng = np.random.RandomState(seed)
    for w in g.trainable_weights:
        value = np_(w)
        if len(w.shape) >= 2:  # (fan in, fan out) of a dense kernel or a k×k convolution's
            fan_in, fan_out = np.prod(w.shape[:-1]), np.prod(w.shape[:-2]) * w.shape[-1]
            value = rng.uniform(-1, 1, w.shape) * np.sqrt(6 / (fan_in + fan_out))
        w.assign(scale * value)
    return g


def dense_g(d, hidden=16, coeff=0.9, scale=3.0, seed=0, act="elu"):
    """g = SN-dense → ELU (or LipSwish) → SN-dense, kernels scaled up so the normalisation is active."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((d,))
    h = SpectralDense(d, coeff)(activation(act)(SpectralDense(hidden, coeff)(x)))
    return scaled(keras.Model(x, h), scale, seed)


def conv_g(shape, width=4, coeff=0.9, scale=3.0, seed=0, act="elu"):
    keras.utils.set_random_seed(seed)
    x = keras.Input(shape)
    h = SpectralConv2D(shape[-1], 3, coeff)(activation(act)(SpectralConv2D(width, 3, coeff)(x)))
    return scaled(keras.Model(x, h), scale, seed)


def g_jacobians(g, x):
    """(B, D, D) Jacobians of g at x, brute force (flowkit.backend.vjp, row i = e_iᵀ J)."""
    return np_(backend.vjp(g, tensor(x))[1].jacobian())


def estimates(block, x, logdet, terms):
    """Per-example log-det estimates of `block` at x, by the layer's own estimator code."""
    x = keras.ops.convert_to_tensor(x)
    _, pullback = backend.vjp(block.g, x)
    return keras.ops.convert_to_numpy(block.log_det(pullback, x, logdet=logdet, terms=terms))


# --- spectral normalisation ---------------------------------------------------------------------

def operator(layer, kernel=None):
    """The matrix of a spectral layer's linear map (its normalised kernel by default), brute force."""
    kernel = keras.ops.convert_to_numpy(layer.normalized_kernel() if kernel is None else kernel).astype(np.float64)
    if isinstance(layer, SpectralDense):
        return kernel
    shape = (*layer.image_size, kernel.shape[2])
    n = int(np.prod(shape))
    return np_(keras.ops.conv(np.eye(n).reshape(n, *shape), kernel, 1, "same")).reshape(n, -1)


def norm(matrix):
    return np.linalg.svd(matrix, compute_uv=False)[0]


def test_spectral_sigma_bounds_the_operators_norm(float64):
    """σ of a k×k conv is the norm of the circular convolution on the (H+1)×(W+1) grid (brute force,
    wrap padding), an upper bound of the zero-padded operator's norm, not the reshaped kernel's norm;
    σ of a 1×1 conv or a dense layer is exact. The normalised maps have norm ≤ c."""
    rng = np.random.RandomState(0)
    layer = SpectralConv2D(3, 3, coeff=0.9)
    layer.build((None, 5, 5, 2))
    layer.kernel.assign(3 * rng.randn(3, 3, 2, 3))
    sigma, true = float(layer.sigma()), norm(operator(layer, layer.kernel))
    grid = np.eye(72).reshape(72, 6, 6, 2)
    wrapped = np.concatenate([grid[:, -1:], grid, grid[:, :1]], 1)
    wrapped = np.concatenate([wrapped[:, :, -1:], wrapped, wrapped[:, :, :1]], 2)
    assert sigma == pytest.approx(norm(np_(keras.ops.conv(wrapped, layer.kernel, 1, "valid")).reshape(72, -1)),
                                  rel=1e-9)
    assert true <= sigma <= 1.2 * true
    assert abs(norm(np_(layer.kernel).reshape(-1, 3)) - true) > 0.1
    assert 0.9 / 1.2 <= norm(operator(layer)) <= 0.9 + 1e-9
    for layer, shape in [(SpectralConv2D(4, 1, coeff=0.5), (None, 4, 4, 3)), (SpectralDense(4, coeff=0.5), (None, 6))]:
        layer.build(shape)
        layer.kernel.assign(layer.kernel * 5)
        assert float(layer.sigma()) == pytest.approx(norm(operator(layer, layer.kernel)), rel=1e-9)
        assert norm(operator(layer)) == pytest.approx(0.5, rel=1e-9)


def test_spectral_layers_under_mixed_precision():
    """bfloat16 compute, σ in the float32 variable dtype (the SVD has no bfloat16 kernel)."""
    keras.config.set_dtype_policy("mixed_bfloat16")
    for layer, x in [(SpectralConv2D(4, 3, coeff=0.9), np.ones((2, 5, 5, 3))), (SpectralDense(4, coeff=0.9), np.ones((2, 6)))]:
        assert keras.backend.standardize_dtype(layer(x).dtype) == "bfloat16"
        assert keras.backend.standardize_dtype(layer.sigma().dtype) == "float32"
        layer.kernel.assign(layer.kernel * 5)
        assert norm(operator(layer)) <= 0.9 * (1 + 1e-6)


@pytest.mark.parametrize("act", ["elu", "lipswish"])
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_lipschitz_bound_holds_during_training(kind, act, float64):
    """Trained at a high learning rate, every normalised map has norm ≤ c at every step (the true
    largest singular value of its brute-force matrix), and so Lip(g) ≤ c²: the largest singular value
    of J_g at random inputs. (With power iteration's σ̂ the maps reached 1.13–1.29·c here.)"""
    shape = (4,) if kind == "dense" else (3, 3, 2)
    g = dense_g(4, scale=1.0, act=act) if kind == "dense" else conv_g(shape, scale=1.0, act=act)
    layers = [l for l in g.layers if isinstance(l, (SpectralDense, SpectralConv2D))]
    worst = {"map": 0.0, "sigma": 0.0}

    class Watch(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            assert self.model is not None  # reading it writes the weights back (JAX's fit holds them mid-epoch)
            for l in layers:
                worst["map"] = max(worst["map"], norm(operator(l)) / l.coeff)
                worst["sigma"] = max(worst["sigma"], float(l.sigma()) / l.coeff)

    x_in = keras.Input(shape)
    model = keras.Model(x_in, keras.layers.Flatten()(ResidualFlow(g, logdet="exact")(x_in)))
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=prior_nll)
    rng = np.random.RandomState(0)
    data = 4 * rng.standard_normal((256, *shape))  # a wide density: g grows to its bound
    model.fit(data, np.zeros(256), batch_size=32, epochs=3, verbose=0,
              callbacks=[Watch()])
    assert worst["sigma"] > 1.5  # the normalisation is active, so the bound is being tested
    assert worst["map"] <= 1 + 1e-9
    jac = g_jacobians(g, rng.standard_normal((32, *shape)))
    assert np.linalg.svd(jac, compute_uv=False).max() <= 0.9 ** 2 + 1e-9


def test_lipswish_is_one_lipschitz(float64):
    """LipSwish(x) = x·σ(βx)/1.1, β = softplus(b): its derivative stays within [−1, 1] for every β, and
    comes within 0.1 % of 1 (the bound is tight, so a wrong constant would fail it)."""
    layer = LipSwish()
    x = tensor(np.linspace(-30, 30, 20001)[:, None].repeat(5, axis=1))
    layer.build(x.shape)
    assert keras.ops.convert_to_numpy(layer.b) == pytest.approx(0.5)
    layer.b.assign(np.array([-5.0, 0.0, 0.5, 3.0, 20.0]))  # β from 0.007 to 20
    y = layer(x)
    slope = np_(backend.grad_of_sum(layer, x))  # element-wise: each entry's own derivative
    beta = np.log1p(np.exp(np_(layer.b)))
    np.testing.assert_allclose(np_(y), np_(x) / (1 + np.exp(-beta * np_(x))) / 1.1, rtol=1e-12)
    assert np.abs(slope).max() <= 1
    assert slope[:, 1:].max() > 0.999


# --- the fixed-point inverse --------------------------------------------------------------------

def test_fixed_point_inverse_within_banach_bound(float64):
    g = dense_g(6, seed=1)
    lip = np.linalg.svd(g_jacobians(g, np.random.RandomState(1).randn(64, 6)), compute_uv=False).max()
    assert 0.5 < lip <= 0.9 + 1e-6
    block = ResidualFlow(g)
    x = tensor(np.random.RandomState(2).randn(16, 6))
    y = block(x)
    first = np.linalg.norm(np_(g(y)), axis=1).max()  # ‖x_1 − x_0‖ = ‖g(y)‖
    k = banach_iterations(0.9, first, 1e-5)
    n, x_rec, _ = block.fixed_point(y, tol=0.0, max_iter=k)
    assert int(n) == k
    assert np.abs(np_(x_rec) - np_(x)).max() <= 1e-5
    # one iteration is not enough: the check can fail
    assert np.abs(np_(block.fixed_point(y, tol=0.0, max_iter=1)[1]) - np_(x)).max() > 1e-3
    # the layer's own inverse stops at its tolerance, and shares the variables
    inv = block.inverse()
    assert inv.inverse() is block
    assert np.abs(np_(inv(y)) - np_(x)).max() <= 1e-6
    g.trainable_weights[0].assign(g.trainable_weights[0] * 0.5)
    assert np.abs(np_(inv(block(x))) - np_(x)).max() <= 1e-6


# --- the log-det estimators ---------------------------------------------------------------------

@pytest.mark.parametrize("act", ["elu", "lipswish"])
@pytest.mark.parametrize("shape", [(4,), (3, 3, 2)])  # 4 dims: row by row; 18 dims: batch_jacobian
def test_exact_log_det_equals_slogdet(shape, act, float64):
    g = dense_g(4, seed=1, act=act) if len(shape) == 1 else conv_g(shape, act=act)
    block = ResidualFlow(g, logdet="exact")
    x = tensor(np.random.RandomState(3).randn(8, *shape))
    block(x)
    want = jacobian_log_det(lambda x: x + g(x), x)
    assert np.abs(want).max() > 0.1
    assert -float(block.losses[0]) == pytest.approx(want.mean(), abs=1e-9)
    assert estimates(block, x, "exact", 1) == pytest.approx(want, abs=1e-9)


def series(jac, n):
    """Σ_{k≤n} (−1)^{k+1} tr(J^k)/k per example, from the matrices."""
    total, power = 0.0, np.broadcast_to(np.eye(jac.shape[-1]), jac.shape)
    for k in range(1, n + 1):
        power = power @ jac
        total = total + (-1) ** (k + 1) * np.trace(power, axis1=1, axis2=2) / k
    return total


def test_truncated_estimator_mean_approaches_exact(float64):
    """Hutchinson's truncated series: its mean is the n-term series, whose bias shrinks as n grows."""
    g = dense_g(4, seed=6)
    block = ResidualFlow(g, seed=0)
    x0 = np.random.RandomState(4).randn(1, 4)
    jac = g_jacobians(g, x0)
    exact = np.linalg.slogdet(np.eye(4) + jac[0])[1]
    draws = tensor(np.repeat(x0, 4000, axis=0))  # 4000 independent v's on one point
    biases = []
    for n in (1, 2, 4, 8, 16):
        est = estimates(block, draws, "truncated", n)
        se = est.std() / np.sqrt(len(est))
        assert est.mean() == pytest.approx(series(jac, n)[0], abs=4 * se)
        biases.append(abs(series(jac, n)[0] - exact))
    assert biases[0] > 0.01 and biases[-1] < 1e-3 and biases == sorted(biases, reverse=True)


@pytest.mark.parametrize("act", ["elu", "lipswish"])
def test_roulette_estimator_is_unbiased(act, float64):
    """Russian roulette: the mean over many draws (a random number of terms per batch) matches the
    exact log-det within a few standard errors, where the one term it always computes, truncated,
    is off by more than 5."""
    g = dense_g(4, seed=6, act=act)
    block = ResidualFlow(g, logdet="roulette", terms=1, p=0.5, seed=1)
    x0 = np.random.RandomState(4).randn(1, 4)
    jac = g_jacobians(g, x0)
    exact = np.linalg.slogdet(np.eye(4) + jac[0])[1]
    batch = tensor(np.repeat(x0, 32, axis=0))
    fn = backend.function(lambda x: roulette_draw(block, x), block.variables)
    means = np.array([np_(fn(batch)).mean() for _ in range(1000)])  # one N per batch: batch means are the draws
    se = means.std(ddof=1) / np.sqrt(len(means))
    assert means.mean() == pytest.approx(exact, abs=4 * se)
    assert abs(series(jac, 1)[0] - exact) > 5 * se


def roulette_draw(block, x):
    _, pullback = backend.vjp(block.g, x)
    return block.log_det(pullback, x)


def test_training_differentiates_through_the_roulette_estimate():
    """On the backend that runs, the gradient of a block's roulette log-det (a loop of random length,
    flowkit.backend.bounded_while: on JAX a scan, with jax.grad through it) reaches g's kernels, finite
    and non-zero; a training step whose only loss is that estimate moves them, to finite values."""
    g = dense_g(4, seed=4)
    block = ResidualFlow(g, logdet="roulette", terms=2, p=0.5, seed=1)
    x = np.random.RandomState(5).randn(8, 4).astype("float32")
    kernels = [w for w in g.trainable_weights if len(w.shape) == 2]
    _, grads = backend.gradients(lambda x: keras.ops.mean(block(x, return_log_det=True)[1]), kernels, [tensor(x)])
    for grad in grads[1:]:
        grad = np_(grad)
        assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 1e-4

    x_in = keras.Input((4,))
    model = keras.Model(x_in, block(x_in))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=lambda _, z: 0.0 * keras.ops.sum(z, axis=-1))
    before = [np_(w) for w in kernels]
    loss = model.train_on_batch(x, np.zeros(8))
    assert np.isfinite(loss) and loss != 0  # the loss is −(the estimate)
    for w, old in zip(kernels, before):
        assert np.all(np.isfinite(np_(w))) and np.abs(np_(w) - old).max() > 1e-6


def test_held_kernels_give_the_same_numbers():
    """The fixed-point loop and the log-det's products hold each spectral layer's normalised kernel (its
    SVDs once per call of the block, not at every step): bit for bit what g gives computing them at every
    call, and the gradient through the log-det to the kernels is the un-held one's."""
    g = conv_g((4, 4, 2), seed=1)
    block = ResidualFlow(g, logdet="exact")
    x = tensor(np.random.RandomState(4).randn(4, 4, 4, 2).astype("float32"))
    y, log_det = block(x, return_log_det=True)
    n, x_k, change = 0, y, np.inf
    while n < block.max_iter and change > block.tol:  # Banach's iteration by hand, g as it is called anywhere
        x_new = y - g(x_k)
        n, x_k, change = n + 1, x_new, float(keras.ops.max(keras.ops.abs(x_new - x_k) / (1 + keras.ops.abs(x_new))))
    iterations, x_rec, _ = block.fixed_point(y)
    assert int(iterations) == n > 3
    assert np.array_equal(np_(x_rec), np_(x_k))

    def unheld(x):
        return keras.ops.slogdet(backend.vjp(g, x)[1].jacobian() + keras.ops.eye(32))[1]

    assert np.array_equal(np_(log_det), np_(unheld(x)))
    kernels = [w for w in g.trainable_weights if len(w.shape) == 4]
    _, held_grads = backend.gradients(lambda x: keras.ops.mean(block(x, return_log_det=True)[1]), kernels, [x])
    _, want = backend.gradients(lambda x: keras.ops.mean(unheld(x)), kernels, [x])
    for got, expected in zip(held_grads[1:], want[1:]):
        assert np.abs(np_(expected)).max() > 1e-3
        np.testing.assert_allclose(np_(got), np_(expected), rtol=1e-4, atol=1e-5)


def test_building_the_model_computes_no_log_det_and_no_inverse(monkeypatch):
    """A functional model's build only infers shapes: the blocks skip their power series and fixed-point
    loops there (seconds each), and the built encoder still adds every block's −log-det when called."""
    calls = []
    for method in ("log_det", "fixed_point"):
        original = getattr(ResidualFlow, method)
        monkeypatch.setattr(ResidualFlow, method,
                            lambda self, *a, _f=original, _m=method, **k: calls.append(_m) or _f(self, *a, **k))
    keras.utils.set_random_seed(0)
    encoder, decoder, _ = iresnet.build_iresnet(**TINY)
    assert calls == [] and encoder.output.shape == (None, 784) and decoder.output.shape == (None, 28, 28, 1)
    x = np.random.RandomState(0).uniform(size=(2, 28, 28, 1)).astype("float32")
    encoder(x)
    assert calls == ["log_det"] * 2 and len(encoder.losses) == 1 and float(encoder.losses[0]) != 0
    assert np_(decoder(encoder(x))).shape == (2, 28, 28, 1) and calls[-2:] == ["fixed_point"] * 2


# --- the whole model ----------------------------------------------------------------------------

def tiny_model(digits, **kwargs):
    keras.utils.set_random_seed(0)
    encoder, decoder, flow = iresnet.build_iresnet(**{**TINY, **kwargs})
    perturb(encoder, 0.2)
    x = dequantize(digits[:8, ..., None], 0, 1 / 256)
    initialize_actnorms(encoder, x)
    return encoder, decoder, flow, x


def test_round_trip_and_save_load(digits, tmp_path):
    encoder, decoder, flow, x = tiny_model(digits)
    z = np_(encoder(x, training=False))
    assert z.shape == (8, 784) and np.abs(z).max() > 1.0
    assert np.abs(np_(decoder(z)) - x).max() <= 1e-4
    assert isinstance(flow.steps[2], ResidualFlow) and flow.steps[2].inverse().inverse() is flow.steps[2]
    path = str(tmp_path / "m.weights.h5")
    encoder.save_weights(path)
    again, decoder2, flow2 = iresnet.build_iresnet(**TINY)
    again.load_weights(path)
    np.testing.assert_array_equal(np_(again(x, training=False)), z)
    np.testing.assert_array_equal(np_(decoder2(z)), np_(decoder(z)))


@pytest.mark.parametrize("factor_out", [False, True])
def test_logit_and_factor_out_log_det_is_the_jacobians(factor_out, float64):
    """--logit and --factor-out: the flow's per-image log-det (exact block log-dets) equals the brute-force
    Jacobian's of x -> z, pixels in [0, 1) to z; the decoder inverts it; a factored-out model has its
    MultiScale exit and still maps 64 pixels to 64 codes."""
    keras.utils.set_random_seed(0)
    encoder, decoder, flow = iresnet.build_iresnet((8, 8, 1), stages=2, blocks=1, width=8, logdet="exact",
                                                   logit=0.01, factor_out=factor_out)
    perturb(encoder, 0.2)
    x = np.random.RandomState(0).uniform(0, 1, (2, 8, 8, 1))
    assert isinstance(flow.steps[0], Logit) and any(isinstance(s, MultiScale) for s in flow.steps) == factor_out
    z, log_det = flow(tensor(x), return_log_det=True)
    np.testing.assert_allclose(np_(log_det), jacobian_log_det(encoder, x), rtol=1e-7, atol=1e-6)
    assert z.shape == (2, 64) and np.abs(np_(decoder(z)) - x).max() <= 1e-5
    assert len(list(iresnet.block_inputs(flow, tensor(x)))) == 2  # both stages' blocks, nested or not


def test_evaluation_estimate_is_close_to_exact(digits, float64):
    """The per-image NLL with roulette (evaluation) against exact log-dets: equal within the s.e."""
    encoder, _, flow, x = tiny_model(digits, stages=1)
    x = tensor(x[:2])
    exact = np_(iresnet.nll_per_image(flow, x, "exact", 1))
    assert flow.steps[2].logdet == "truncated"  # the estimator is the evaluation's only within it
    draws = np.stack([np_(iresnet.nll_per_image(flow, x, "roulette", 4)) for _ in range(20)])
    se = draws.std(axis=0, ddof=1) / np.sqrt(len(draws))
    assert np.all(np.abs(draws.mean(axis=0) - exact) <= 4 * se + 1e-6)
    z = encoder(x)
    reported = float(np.mean(np_(prior_nll(None, z)))) + sum(float(np_(l)) for l in encoder.losses)
    assert np.mean(exact) == pytest.approx(reported, abs=5.0)  # the training loss is an estimate of it


def test_short_training_lowers_the_loss(digits):
    encoder, _, _, _ = tiny_model(digits, blocks=1, stages=1)
    iresnet.compile_flow(encoder, 2e-3)
    x = dequantize(digits[:128, ..., None], 0, 1 / 256)
    hist = encoder.fit(x, np.zeros(len(x)), batch_size=32, epochs=4, verbose=0).history["loss"]
    assert hist[-1] < hist[0] - 20


def test_grow_starts_from_the_trained_density(digits, tmp_path):
    """--init-from: a 2-block-per-stage model grown from a trained 1-block one encodes as it did (new
    blocks' g ≈ 0, new Actnorms the identity and left alone by the data-dependent init); its copied
    layers equal the source's; a wider model does not grow from it (one-line error)."""
    encoder, _, flow, x = tiny_model(digits, activation="lipswish")
    path = str(tmp_path / "small.weights.h5")
    save_weights_atomic(encoder, path, {"model": "iresnet", **TINY, "coeff": 0.9, "activation": "lipswish"})
    config = dict(stages=2, blocks=2, width=8, coeff=0.9, logdet="truncated", terms=4, activation="lipswish",
                  logit=0.0, factor_out=False)
    big, _, big_flow = iresnet.build_iresnet(**config)
    # actnorm_in, 2 squeezes, 2 × (block, Actnorm), flatten of the 12 layers
    assert iresnet.grow(big_flow, path, config) == (8, 12)
    assert initialize_actnorms(big, x) == 0
    z, z_big = np_(encoder(x, training=False)), np_(big(x, training=False))
    assert 0 < np.abs(z_big - z).max() <= 1e-2 * np.abs(z).max()
    np.testing.assert_array_equal(np_(big_flow.steps[2].g.layers[-1].kernel), np_(flow.steps[2].g.layers[-1].kernel))
    with pytest.raises(UserError, match="--width 8"):
        iresnet.grow(iresnet.build_iresnet(**{**config, "width": 16})[2], path, {**config, "width": 16})


def test_toy_density_integrates_to_one(float64):
    """Exact 2-D log-densities of an i-ResNet (untrained, perturbed; its own estimator the truncated
    series) and of the coupling flow: log N(f(x)) + the brute-force Jacobian's log-det, and q sums to
    ≈ 1 over a grid."""
    keras.utils.set_random_seed(0)
    encoder, decoder, flow = iresnet.build_iresnet((2,), blocks=3, width=16, logdet="truncated", terms=1)
    g = np.linspace(-10, 10, 301)
    grid = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    x = iresnet.toy_data("8gaussians", 100, np.random.RandomState(1))
    for model, f in [(encoder, flow), iresnet.build_coupling_flow(steps=3, width=8)]:
        perturb(model, 0.3)
        initialize_actnorms(model, iresnet.toy_data("moons", 500, np.random.RandomState(0)))
        want = jacobian_log_det(model, x) - np_(prior_nll(None, model(x)))
        assert iresnet.log_density(f, x) == pytest.approx(want, abs=1e-8)
        q = np.exp(iresnet.log_density(f, grid))
        assert q.sum() * (g[1] - g[0]) ** 2 == pytest.approx(1.0, abs=0.02)
    assert flow.steps[1].logdet == "truncated"
    assert np.abs(np_(decoder(encoder(x))) - x).max() <= 1e-6


# --- the command line ---------------------------------------------------------------------------

@pytest.mark.slow  # a subprocess run, then two in-process: ~1 min, see pytest.ini
def test_tiny_run(digits, tmp_path, capsys):
    npz = mnist_npz(tmp_path / "mnist.npz", digits, 64, 32)
    run = forkrun.run([sys.executable, "iresnet.py", "--data", npz, "--epochs", "1", "--batch-size", "32",
                          "--width", "8", "--blocks", "1", "--terms", "2", "--eval-images", "32",
                          "--eval-draws", "2", "--activation", "lipswish", "--warmup", "1", "--epoch-grids",
                          "--weights", str(tmp_path / "i.weights.h5"),
                          "--out", str(tmp_path / "out")], cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"test bits/dim: \d+\.\d{3}", last), last
    assert os.path.getsize(tmp_path / "out" / "iresnet_samples.png") > 0
    assert os.path.getsize(tmp_path / "out" / "iresnet_epoch_001.png") > 0
    assert "estimator s.e." in run.stdout
    # the activation comes back from the weights' record: LipSwish's β would not load into ELU blocks
    # in-process from here (the command line is the run's above)
    capsys.readouterr()
    assert iresnet.main(["--data", npz, "--inverse", "--images", "4", "--weights", str(tmp_path / "i.weights.h5")]) == 0
    errors = [float(e) for e in re.findall(r"max \|x − x_rec\| ([0-9.e+-]+)", capsys.readouterr().out)]
    assert len(errors) == 2 and max(errors) <= 1e-4
    assert iresnet.main(["--toy", "8gaussians", "--limit", "256", "--epochs", "1", "--toy-blocks", "2", "--width", "8",
                         "--out", str(tmp_path / "toy")]) == 0
    assert re.fullmatch(r"test NLL \(nats\): i-ResNet \d+\.\d{3}, coupling flow \d+\.\d{3}",
                        capsys.readouterr().out.strip().splitlines()[-1])
    assert os.path.getsize(tmp_path / "toy" / "iresnet_toy_8gaussians.png") > 0


@pytest.mark.parametrize("argv, message", [
    (["--coeff", "1.2"], "--coeff must be below 1"),
    (["--logdet", "exactly"], "invalid choice"),
    (["--data", "missing.npz"], "missing.npz: no such file"),
    (["--toy", "spiral"], "invalid choice"),
    (["--inverse", "--weights", "none.weights.h5"], "no such file"),
    (["--init-from", "none.weights.h5"], "--init-from none.weights.h5: no such file"),
    (["--activation", "relu"], "invalid choice"),
    (["--warmup", "0"], "must be positive"),
    (["--logit", "0.5"], "--logit must lie in [0, 0.5)"),
    (["--toy", "moons", "--logit", "1e-6"], "--logit transforms pixels"),
])
def test_bad_input_one_line_exit_2(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert iresnet.main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()
