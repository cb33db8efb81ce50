"""Per-layer properties of flow_layers.py (docs/design.md §2–§4, §7).

Every flow layer is described once by a `Case`: how to build it, an input, and how to wrap it into a
square map x -> z of one tensor (so that multi-input/multi-output layers such as Split, AffineCouple,
CondActnorm and a class-conditional TarBlock get a Jacobian with a determinant). The composites go
through the same table: a Flow, glow.glow_step, MultiScale, glow.glow_flow, and ResidualFlow (which is how the
spectrally normalised layers are checked). The generic tests then check, per case: round trip (float32
and float64), inverse().inverse(), variable sharing, the reported log-det against autodiff + slogdet
(batch mean from the added loss; per example from return_log_det=True, which adds no loss), the
layer's own log-det formula, batch-mean losses, get_config and save/load.
The layer-specific tests below them check layouts, Actnorm init, UniformNoise and the §7 trap.
"""
import dataclasses
import json
from typing import Callable, Optional

import keras
import numpy as np
import pytest
from keras import ops

import flow_layers as fl
import glow
import tarflow
from flowkit import kernels
from helpers import jacobian_log_det, perturb

B = 3  # batch size of every test input


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)




def np_(x):
    return ops.convert_to_numpy(x)


def reported_logdet(obj):
    """log|det J| per image the layer/model reports: minus the sum of the losses of its last call."""
    return -sum(float(np_(l)) for l in obj.losses)


def halves(x, first=None):
    d = x.shape[-1]
    first = d // 2 if first is None else first
    return x[..., :first], x[..., first:]


def cat(parts):
    return ops.concatenate(list(parts), axis=-1)


def mlp(d_in, d_out, last_activation=None):
    """A coupling network ending in a zero-initialised layer (docs/design.md §3: each step starts as
    identity)."""
    return keras.Sequential([keras.Input((d_in,)), keras.layers.Dense(8, activation="tanh"),
                             keras.layers.Dense(d_out, activation=last_activation,
                                                kernel_initializer="zeros")])


def identity_split(L, x):
    return cat(L(x))


# --------------------------------------------------------------------------------------------------
# Cases


@dataclasses.dataclass
class Case:
    make: Callable  # seed -> unbuilt layer
    shape: tuple  # per-example input shape
    apply: Callable = lambda L, x: L(x)  # square map x -> z through layer L
    unapply: Callable = lambda Li, z: Li(z)  # z -> x through Li = L.inverse()
    formula: Optional[Callable] = None  # (layer, x) -> expected per-image log-det (batch mean); None:
    #                                     no closed form, the autodiff Jacobian is the only check
    stateful: bool = True  # has weights whose reload must restore the map
    configurable: bool = True  # has a get_config that rebuilds it
    settle: Callable = lambda layer: None  # run after the weights are perturbed (spectral norms)
    atol32: float = 1e-5  # round-trip tolerance in float32 ...
    atol64: float = 1e-12  # ... and float64: an iterative inverse stops at its own tolerance
    domain: Callable = lambda x: x  # maps the normal test input into the layer's domain


def zero(layer, x):
    return 0.0


VOLUME_PRESERVING = (fl.Permute, fl.Split, fl.Concat, fl.Squeeze, fl.Reshape, fl.CheckerSplit,
                     fl.Flip, fl.Patchify)  # CheckerConcat is a CheckerSplit


def closed_form(layer, inputs):
    """(outputs, log|det| per example) of a flow layer on `inputs` by the articles' formulas, never by
    the layer's own log-det: coupling Σ log s (0 without a scale net); Scale and Actnorm H·W·Σ log-scale;
    1×1 conv H·W·Σ log|diag U| (= H·W·slogdet W); CondActnorm −Σ log σ; TarBlock −Σ a; permutations,
    splits, squeezes, reshapes 0; a Flow the sum of its steps' (NICE eq. 10–11), each step fed the
    previous one's outputs; MultiScale the prior's plus the inner flow's."""
    outputs = layer(inputs, return_log_det=True)[0]
    n = keras.tree.flatten(inputs)[0].shape[0]
    if isinstance(layer, fl.Flow):
        total = np.zeros(n)
        for step in layer.steps:
            inputs, log_det = closed_form(step, inputs)
            total = total + log_det
        return inputs, total
    if isinstance(layer, fl.MultiScale):
        x1, x2 = halves(inputs)
        return outputs, closed_form(layer.prior, [x2, x1])[1] + closed_form(layer.inner, x1)[1]
    if isinstance(layer, VOLUME_PRESERVING):
        return outputs, np.zeros(n)
    if isinstance(layer, fl.AffineCouple):
        if layer.joint:  # one network: [log s, t] along its last axis
            out = np_(layer.shift_model(inputs[0]))
            log_s = out[..., : out.shape[-1] // 2]
        elif layer.log_scale_model is None:
            return outputs, np.zeros(n)
        else:
            log_s = np_(layer.log_scale_model(inputs[0]))
        return outputs, log_s.reshape(n, -1).sum(axis=1)
    x = inputs[0] if isinstance(inputs, (list, tuple)) else inputs
    h_w = int(np.prod(x.shape[1:-1]))
    if isinstance(layer, (fl.Scale, fl.Actnorm)):
        return outputs, np.full(n, h_w * float(np.sum(np_(layer.log_scale))))
    if isinstance(layer, fl.InvDense):
        by_u = h_w * float(np.sum(np_(layer.log_s)))
        sign, by_kernel = np.linalg.slogdet(np_(layer.kernel()))
        assert sign != 0
        np.testing.assert_allclose(by_u, h_w * by_kernel, rtol=1e-5, atol=1e-6)
        return outputs, np.full(n, by_u)
    if isinstance(layer, fl.CondActnorm):
        log_sigma = np_(layer.conv(inputs[1]))[..., layer.channels:]
        return outputs, -log_sigma.reshape(n, -1).sum(axis=1)
    if isinstance(layer, fl.Logit):  # RealNVP §4.1: log(1 − 2α) − log y − log(1 − y) per dimension
        y = layer.alpha + (1 - 2 * layer.alpha) * np.asarray(x, dtype="float64")
        return outputs, (np.log(1 - 2 * layer.alpha) - np.log(y) - np.log1p(-y)).reshape(n, -1).sum(axis=1)
    if isinstance(layer, fl.TarBlock):
        x, y = inputs if layer.classes else (inputs, None)
        a, _ = layer.params(x, y)
        return outputs, -np_(a).reshape(n, -1).sum(axis=1)
    raise TypeError(f"no closed-form log-det for {type(layer).__name__}")


def by_formula(inputs=lambda x: x):
    """A Case formula: the batch mean of closed_form on the layer's inputs (made from the case's x)."""
    return lambda layer, x: float(np.mean(closed_form(layer, inputs(x))[1]))


def couple_apply(L, x):
    return cat(L(list(halves(x))))


def couple_unapply(Li, z):
    return cat(Li(list(halves(z))))


def concat_unapply(Li, z):
    parts = Li(z)
    assert [p.shape[-1] for p in parts] == [3, 5]  # the sizes Concat was built with
    return cat(parts)


def cond_apply(L, x):
    x2, x1 = halves(x)
    return cat([L([x2, x1]), x1])


def cond_unapply(Li, z):
    z2, x1 = halves(z)
    return cat([Li([z2, x1]), x1])


def labels(x):
    """Class labels (0, 1, 2) read off token 0, which a TarBlock passes through unchanged (a = μ = 0
    there): a label per example for any batch, and the inverse reads the same labels off z."""
    return ops.cast(ops.mod(ops.floor(2 * x[:, 0, 0]), 3), "int32")


def nice_flow(seed):
    """NICE's encoder in small: shuffle, split, (affine) coupling, concat, scale."""
    return fl.Flow([fl.Permute("random", seed=seed), fl.Split(), fl.AffineCouple(mlp(4, 4), mlp(4, 4)),
                    fl.Concat(), fl.Scale()])


def residual_flow(shape, conv=False, coeff=0.9):
    """y = x + g(x), g = spectral layer -> ELU -> spectral layer, with the exact (brute-force) log-det."""
    x = keras.Input(shape)
    if conv:
        h = fl.SpectralConv2D(shape[-1], 3, coeff)(
            keras.layers.Activation("elu")(fl.SpectralConv2D(4, 3, coeff)(x)))
    else:
        h = fl.SpectralDense(shape[-1], coeff)(keras.layers.Activation("elu")(fl.SpectralDense(8, coeff)(x)))
    return fl.ResidualFlow(keras.Model(x, h), logdet="exact")


CASES = {
    "permute_reverse": Case(lambda s: fl.Permute("reverse"), (8,), formula=zero, stateful=False),
    "permute_random": Case(lambda s: fl.Permute("random", seed=s), (8,), formula=zero),
    "split_halves": Case(lambda s: fl.Split(), (8,), apply=identity_split,
                         unapply=lambda Li, z: Li(list(halves(z))), formula=zero, stateful=False),
    "split_interleave": Case(lambda s: fl.Split(interleave=True), (8,), apply=identity_split,
                             unapply=lambda Li, z: Li(list(halves(z))), formula=zero, stateful=False),
    # unequal sizes: the inverse must split back into the sizes seen when built
    "concat_halves": Case(lambda s: fl.Concat(), (8,), apply=lambda L, x: L(list(halves(x, 3))),
                          unapply=concat_unapply, formula=zero, stateful=False),
    "concat_interleave": Case(lambda s: fl.Concat(interleave=True), (8,),
                              apply=lambda L, x: L(list(halves(x))),
                              unapply=lambda Li, z: cat(Li(z)), formula=zero, stateful=False),
    "additive": Case(lambda s: fl.AffineCouple(mlp(4, 4)), (8,), apply=couple_apply,
                     unapply=couple_unapply, formula=zero),
    "subtract": Case(lambda s: fl.AffineCouple(mlp(4, 4, "relu"), subtract=True), (8,),
                     apply=couple_apply, unapply=couple_unapply, formula=zero),
    "affine": Case(lambda s: fl.AffineCouple(mlp(4, 4), mlp(4, 4)), (8,), apply=couple_apply,
                   unapply=couple_unapply, formula=by_formula(lambda x: list(halves(x)))),
    "affine_joint": Case(lambda s: fl.AffineCouple(mlp(4, 8), joint=True), (8,), apply=couple_apply,
                         unapply=couple_unapply, formula=by_formula(lambda x: list(halves(x)))),
    "glow_step_separate": Case(lambda s: glow.glow_step(4, 4, "t", permute="conv", coupling="affine",
                                                        affine_net="separate"), (2, 2, 4), formula=by_formula()),
    "scale": Case(lambda s: fl.Scale(), (8,), formula=by_formula()),
    "scale_image": Case(lambda s: fl.Scale(), (2, 2, 3), formula=by_formula()),
    "squeeze": Case(lambda s: fl.Squeeze(), (4, 2, 2), formula=zero, stateful=False),
    "unsqueeze": Case(lambda s: fl.Squeeze().inverse(), (2, 1, 8), formula=zero, stateful=False,
                      configurable=False),
    "actnorm": Case(lambda s: fl.Actnorm(), (8,), formula=by_formula()),
    "actnorm_image": Case(lambda s: fl.Actnorm(), (2, 2, 3), formula=by_formula()),
    "invdense": Case(lambda s: fl.InvDense(seed=s), (6,), formula=by_formula()),
    "invdense_image": Case(lambda s: fl.InvDense(seed=s), (2, 2, 4), formula=by_formula()),
    "condactnorm": Case(lambda s: fl.CondActnorm(), (2, 2, 4), apply=cond_apply,
                        unapply=cond_unapply, formula=by_formula(lambda x: list(halves(x)))),
    "reshape": Case(lambda s: fl.Reshape(), (2, 2, 3), formula=zero, stateful=False),
    # RealNVP's checkerboard: halves concatenated on the channels make the map square; odd height too
    "checker_split_0": Case(lambda s: fl.CheckerSplit(0), (4, 4, 2), apply=identity_split,
                            unapply=lambda Li, z: Li(list(halves(z))), formula=zero, stateful=False),
    "checker_split_1": Case(lambda s: fl.CheckerSplit(1), (3, 2, 1), apply=identity_split,
                            unapply=lambda Li, z: Li(list(halves(z))), formula=zero, stateful=False),
    "checker_concat": Case(lambda s: fl.CheckerConcat(1), (3, 2, 2), apply=lambda L, x: L(list(halves(x))),
                           unapply=lambda Li, z: cat(Li(z)), formula=zero, stateful=False),
    # composites: a Flow's log-det is the sum of its steps', its inverse the steps' inverses reversed
    "flow_nice": Case(nice_flow, (8,), formula=by_formula()),
    "glow_step": Case(lambda s: glow.glow_step(4, 4, "t", permute="conv", coupling="affine"), (2, 2, 4),
                      formula=by_formula()),
    "glow_step_checker": Case(lambda s: glow.glow_step(2, 4, "c", coupling="affine", checker=1), (2, 4, 2),
                              formula=by_formula()),
    "multiscale": Case(lambda s: fl.MultiScale(fl.Flow([fl.Actnorm(), fl.Reshape()])), (2, 2, 4),
                       formula=by_formula()),
    # two levels, their weights moved by 0.2 in the variable-sharing check: float32 rounding reaches
    # 1.5e-5 there on JAX's CPU kernels
    "glow_flow": Case(lambda s: glow.glow_flow(1, level=2, depth=1, hidden=4, coupling="affine"), (4, 4, 1),
                      formula=by_formula(), atol32=3e-5),
    # TarFlow: tokens, their order reversed, a causal-Transformer autoregressive block (unconditional
    # and class-conditional)
    "patchify": Case(lambda s: fl.Patchify(2), (4, 2, 1), formula=zero, stateful=False),
    "flip": Case(lambda s: fl.Flip(), (4, 3), formula=zero, stateful=False),
    "tarblock": Case(lambda s: fl.TarBlock(tarflow.CausalTransformer(8, 1, 2, seed=s), seed=s), (4, 3),
                     formula=by_formula()),
    "tarblock_classes": Case(lambda s: fl.TarBlock(tarflow.CausalTransformer(8, 1, 2, 3, seed=s), seed=s), (4, 3),
                             apply=lambda L, x: L([x, labels(x)]), unapply=lambda Li, z: Li([z, labels(z)]),
                             formula=by_formula(lambda x: [x, labels(x)])),
    "conditional_flow": Case(lambda s: fl.ConditionalFlow([fl.TarBlock(tarflow.CausalTransformer(8, 1, 2, 3, seed=s),
                                                                       seed=s), fl.Flip()]), (4, 3),
                             apply=lambda L, x: L([x, labels(x)]),
                             unapply=lambda Li, z: Li([z, labels(z[:, ::-1])]), formula=None),
    # i-ResNet: y = x + g(x) with spectrally normalised g (how SpectralDense and SpectralConv2D go through
    # the table), inverted by the fixed-point iteration down to its tolerance 1e-6 on the change, so the
    # error is ≤ L/(1 − L)·1e-6·(1 + |x|) by Banach, L = Lip(g) ≤ 0.81 here: looser round trips. The
    # exact log-det is slogdet(I + J_g): no closed form to compare
    # the logit transform in front of an i-ResNet (--logit): inputs in (0, 1), pixels in [0, 1)
    "logit": Case(lambda s: fl.Logit(0.05), (2, 2, 1), formula=by_formula(), stateful=False,
                  domain=lambda x: 1 / (1 + np.exp(-x)), atol32=2e-5),
    "residual_dense": Case(lambda s: residual_flow((3,)), (3,), atol32=2e-5, atol64=2e-5),
    "residual_conv": Case(lambda s: residual_flow((2, 2, 1), conv=True), (2, 2, 1),
                          atol32=2e-5, atol64=2e-5),
}
NAMES = list(CASES)
WITH_LOGDET = ["affine", "affine_joint", "glow_step_separate", "scale", "scale_image", "actnorm", "actnorm_image", "invdense",
               "invdense_image", "condactnorm", "flow_nice", "glow_step", "glow_step_checker",
               "multiscale", "glow_flow", "logit", "tarblock", "tarblock_classes", "conditional_flow", "residual_dense", "residual_conv"]
# the layer classes of flow_layers and TarFlow's network, for deserialising configs that nest them (Flow,
# MultiScale, ResidualFlow, TarBlock)
CUSTOM_OBJECTS = {n: c for module in (fl, tarflow) for n, c in vars(module).items()
                  if isinstance(c, type) and issubclass(c, keras.layers.Layer)}


def data(shape, seed=0):
    return np.random.RandomState(seed).normal(size=(B, *shape)).astype(keras.config.floatx())


def built(name, seed=0, scale=0.3):
    """(case, layer, x): the layer built on x and its trainable weights perturbed (seeded)."""
    case = CASES[name]
    layer = case.make(seed)
    x = case.domain(data(case.shape))
    case.apply(layer, x)
    perturb(layer, scale, seed)
    case.settle(layer)
    return case, layer, x


def model_of(case, layer):
    inp = keras.Input(case.shape)
    return keras.Model(inp, case.apply(layer, inp))


# --------------------------------------------------------------------------------------------------
# Generic properties, every invertible layer


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_float32(name):
    case, layer, x = built(name, scale=0.1)
    z = np_(case.apply(layer, x))
    x_back = np_(case.unapply(layer.inverse(), z))
    assert x_back.dtype == np.float32
    np.testing.assert_allclose(x_back, x, rtol=0, atol=case.atol32)


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_float64(name, float64):
    case, layer, x = built(name, scale=0.3)
    assert x.dtype == np.float64
    z = np_(case.apply(layer, x))
    x_back = np_(case.unapply(layer.inverse(), z))
    assert x_back.dtype == np.float64
    np.testing.assert_allclose(x_back, x, rtol=0, atol=case.atol64)


@pytest.mark.parametrize("name", NAMES)
def test_inverse_of_inverse_is_the_forward_map(name):
    case, layer, x = built(name)
    twice = layer.inverse().inverse()
    np.testing.assert_array_equal(np_(case.apply(twice, x)), np_(case.apply(layer, x)))
    if not isinstance(layer, fl.Inverse):
        assert twice is layer


@pytest.mark.parametrize("name", [n for n in NAMES if CASES[n].stateful])
def test_inverse_shares_the_forward_variables(name):
    case, layer, x = built(name)
    inv = layer.inverse()  # created before the change: must read the variables, not copy them
    z = np_(case.apply(layer, x))
    before = np_(case.unapply(inv, z))
    for w in layer.weights:  # every weight that defines the map, trainable or not
        if w.dtype.startswith("int"):  # a permutation: rotate it
            w.assign(np.roll(np_(w), 1))
        elif w.trainable:
            w.assign(np_(w) + 0.2 * np.random.RandomState(1).normal(size=w.shape))
    after = np_(case.unapply(inv, z))
    assert np.max(np.abs(after - before)) > 1e-3
    # and the inverse still inverts the changed forward layer
    np.testing.assert_allclose(np_(case.unapply(inv, np_(case.apply(layer, x)))), x, atol=case.atol32)


@pytest.mark.parametrize("name", NAMES)
def test_reported_logdet_equals_autodiff_jacobian(name, float64):
    case, layer, x = built(name, scale=0.3)
    per_example = jacobian_log_det(lambda t: case.apply(layer, t), x)
    expected = float(np.mean(per_example))
    case.apply(layer, x)
    assert reported_logdet(layer) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    if name in WITH_LOGDET:  # the perturbation made the check meaningful (the mean's signs may cancel)
        assert np.abs(per_example).max() > 0.05


class PerExample:
    """Stands for a layer in a Case's apply: calls it with return_log_det=True and keeps the log-dets."""

    def __init__(self, layer):
        self.layer, self.log_det = layer, None

    def __call__(self, inputs, **kwargs):
        outputs, self.log_det = self.layer(inputs, return_log_det=True, **kwargs)
        return outputs


@pytest.mark.parametrize("name", [n for n in NAMES if n != "unsqueeze"])  # an Inverse has no log-det
def test_return_log_det_is_the_jacobian_per_example_and_adds_no_loss(name, float64):
    case, layer, x = built(name, scale=0.3)
    expected = jacobian_log_det(lambda t: case.apply(layer, t), x)
    z = np_(case.apply(layer, x))
    assert bool(layer.losses) == (name in WITH_LOGDET)  # a plain call adds the batch mean ...
    per_example = PerExample(layer)
    np.testing.assert_array_equal(np_(case.apply(per_example, x)), z)
    assert layer.losses == []  # ... this one adds nothing (and the plain call's loss is gone)
    log_det = np_(per_example.log_det)
    assert log_det.shape == (B,) and log_det.dtype == np.float64
    np.testing.assert_allclose(log_det, expected, rtol=1e-9, atol=1e-9)
    if name in WITH_LOGDET:  # every example's check is meaningful (the initial weights vary by backend)
        assert np.all(np.abs(expected) > 0.01) and np.abs(expected).max() > 0.05


@pytest.mark.parametrize("name", [n for n in NAMES if CASES[n].formula is not None])
def test_logdet_formula(name):
    """docs/design.md §3: the reported log-det is the articles' formula (closed_form): coupling 0 / Σ log s;
    scale, ActNorm H·W·Σ log-scale; 1×1 conv H·W·Σ log|diag U| (= H·W·slogdet(W)); permutation, split,
    concat, squeeze, reshape 0; CondActnorm −Σ log σ; TarBlock −Σ a; a Flow the sum of its steps'."""
    case, layer, x = built(name)
    case.apply(layer, x)
    assert reported_logdet(layer) == pytest.approx(case.formula(layer, x), rel=1e-5, abs=1e-5)
    if case.formula is zero:
        assert layer.losses == [] or all(float(np_(l)) == 0 for l in layer.losses)


@pytest.mark.parametrize("name", WITH_LOGDET)
def test_losses_are_batch_means(name):
    case, layer, x = built(name)
    case.apply(layer, x)
    once = reported_logdet(layer)
    case.apply(layer, np.concatenate([x, x, x]))
    assert reported_logdet(layer) == pytest.approx(once, rel=1e-5)
    assert len(layer.losses) >= 1


@pytest.mark.parametrize("name", [n for n in NAMES if CASES[n].configurable])
def test_get_config_round_trip(name):
    case, layer, x = built(name)
    with keras.saving.custom_object_scope(CUSTOM_OBJECTS):  # nested flow layers are custom classes
        clone = layer.__class__.from_config(layer.get_config())
    # equal as JSON: Keras writes a slice's key as a list after a round trip, a tuple before
    assert json.loads(json.dumps(clone.get_config())) == json.loads(json.dumps(layer.get_config()))
    case.apply(clone, x)  # builds
    assert len(clone.weights) == len(layer.weights)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(np_(case.apply(clone, x)), np_(case.apply(layer, x)), atol=1e-6)
    np.testing.assert_allclose(np_(case.unapply(clone.inverse(), np_(case.apply(layer, x)))), x,
                               atol=case.atol32)


@pytest.mark.parametrize("name", [n for n in NAMES if CASES[n].stateful])
def test_save_load_weights_restores_the_same_flow(name, tmp_path):
    case, layer, x = built(name, seed=0)
    model = model_of(case, layer)
    path = str(tmp_path / "m.weights.h5")
    model.save_weights(path)

    _, fresh_layer, _ = built(name, seed=1)  # different seed: other permutation, P, signs, weights
    fresh = model_of(case, fresh_layer)
    assert np.max(np.abs(np_(fresh(x)) - np_(model(x)))) > 1e-3
    fresh.load_weights(path)
    np.testing.assert_array_equal(np_(fresh(x)), np_(model(x)))
    for a, b in zip(fresh_layer.weights, layer.weights):
        np.testing.assert_array_equal(np_(a), np_(b))
    np.testing.assert_allclose(np_(case.unapply(fresh_layer.inverse(), np_(model(x)))), x,
                               atol=case.atol32)


def test_every_flow_layer_class_has_a_case():
    """Each FlowLayer subclass of flow_layers is the layer under test of some case (not only nested)."""
    classes = {c for c in CUSTOM_OBJECTS.values() if issubclass(c, fl.FlowLayer) and c is not fl.FlowLayer}
    tested = {type(CASES[n].make(0)) for n in NAMES}
    assert classes - tested == set()
    assert fl.Inverse in tested


def test_model_config_round_trip_with_coupling():
    """A functional model of Split -> AffineCouple -> Concat is re-created from its config + weights."""
    inp = keras.Input((8,))
    couple = fl.AffineCouple(mlp(4, 4), mlp(4, 4))
    z = fl.Concat()(couple(fl.Split()(inp)))
    model = keras.Model(inp, z)
    perturb(model, 0.3)
    objs = {c.__name__: c for c in (fl.Split, fl.Concat, fl.AffineCouple)}
    again = keras.Model.from_config(model.get_config(), custom_objects=objs)
    again.set_weights(model.get_weights())
    x = data((8,))
    np.testing.assert_allclose(np_(again(x)), np_(model(x)), atol=1e-6)
    assert reported_logdet(again) == pytest.approx(reported_logdet(model), rel=1e-5)
    assert reported_logdet(model) != 0


# --------------------------------------------------------------------------------------------------
# Layer-specific properties


def test_permute_reverse_and_random():
    x = data((8,))
    np.testing.assert_array_equal(np_(fl.Permute("reverse")(x)), x[:, ::-1])

    a, b, c = fl.Permute("random", seed=3), fl.Permute("random", seed=3), fl.Permute("random", seed=4)
    za = np_(a(x))
    idxs = np_(a.idxs)
    assert sorted(idxs.tolist()) == list(range(8))
    np.testing.assert_array_equal(za, x[:, idxs])
    np.testing.assert_array_equal(np_(b(x)), za)  # same seed, same permutation
    assert not np.array_equal(np_(c(x)), za)
    assert a.idxs.trainable is False
    with pytest.raises(ValueError, match="mode"):
        fl.Permute("shuffle")


def test_split_and_concat_layouts():
    x = data((8,))
    first, second = (np_(p) for p in fl.Split()(x))
    np.testing.assert_array_equal(first, x[:, :4])
    np.testing.assert_array_equal(second, x[:, 4:])
    even, odd = (np_(p) for p in fl.Split(interleave=True)(x))
    np.testing.assert_array_equal(even, x[:, 0::2])
    np.testing.assert_array_equal(odd, x[:, 1::2])
    np.testing.assert_array_equal(np_(fl.Concat(interleave=True)([even, odd])), x)

    # odd length: halves of sizes d//2 and d - d//2; the inverse concatenates them back
    x7 = data((7,))
    split = fl.Split()
    parts = split(x7)
    assert [p.shape[-1] for p in parts] == [3, 4]
    np.testing.assert_array_equal(np_(split.inverse()(parts)), x7)

    # Concat's inverse splits into the sizes it was built with, on images too
    img = data((2, 2, 5))
    concat = fl.Concat()
    joined = concat([img[..., :1], img[..., 1:]])
    back = concat.inverse()(joined)
    assert [p.shape[-1] for p in back] == [1, 4]
    np.testing.assert_array_equal(np_(back[1]), img[..., 1:])


def test_coupling_equations():
    """NICE eq. 07 (h2 = x2 + m(x1)), eq. 09 as the encoder with subtract=True, RealNVP eq. 01."""
    x = data((8,))
    x1, x2 = halves(x)
    for kwargs, sign in [({}, 1.0), ({"subtract": True}, -1.0)]:
        m = mlp(4, 4, "relu")
        couple = fl.AffineCouple(m, **kwargs)
        couple([x1, x2])
        perturb(m, 0.5)
        h1, h2 = (np_(t) for t in couple([x1, x2]))
        np.testing.assert_array_equal(h1, x1)
        m_x1 = np_(m(x1))
        assert np.all(m_x1 >= 0) and np.max(m_x1) > 0
        np.testing.assert_allclose(h2, x2 + sign * m_x1, atol=1e-6)
        assert couple.losses == []

    t, log_s = mlp(4, 4), mlp(4, 4)
    couple = fl.AffineCouple(t, log_s)
    h1, h2 = couple([x1, x2])
    np.testing.assert_array_equal(np_(h2), x2)  # zero-initialised last layers: identity at init
    assert reported_logdet(couple) == 0
    perturb(couple, 0.3)
    _, h2 = couple([x1, x2])
    np.testing.assert_allclose(np_(h2), x2 * np.exp(np_(log_s(x1))) + np_(t(x1)), atol=1e-6)


def test_checker_split_layout():
    """x1 holds the squares with (row + column) % 2 == parity, x2 the others, row by row."""
    x = np.arange(16, dtype="float32").reshape(1, 4, 4, 1)
    colour = (np.add.outer(np.arange(4), np.arange(4)) % 2).reshape(1, 4, 4, 1)
    for parity in (0, 1):
        x1, x2 = (np_(t) for t in fl.CheckerSplit(parity)(x))
        assert x1.shape == x2.shape == (1, 4, 2, 1)
        np.testing.assert_array_equal(x1.ravel(), x[colour == parity])
        np.testing.assert_array_equal(x2.ravel(), x[colour != parity])
    with pytest.raises(ValueError, match="parity"):
        fl.CheckerSplit(2)


def test_squeeze_pixel_layout():
    x = np.arange(2 * 4 * 6 * 3, dtype="float32").reshape(2, 4, 6, 3)
    z = np_(fl.Squeeze()(x))
    assert z.shape == (2, 2, 3, 12)
    for i in range(2):
        for j in range(3):
            patch = x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2, :]  # (b, di, dj, c)
            # the 2×2 patch becomes the 4c channels of one position, channel-major: c·4 + 2·di + dj
            np.testing.assert_array_equal(z[:, i, j], patch.transpose(0, 3, 1, 2).reshape(2, 12))
    # single channel: the four pixels in reading order
    one = np.arange(16, dtype="float32").reshape(1, 4, 4, 1)
    np.testing.assert_array_equal(np_(fl.Squeeze()(one))[0, 0, 1], [2, 3, 6, 7])

    np.testing.assert_array_equal(np_(fl.Squeeze().inverse()(z)), x)
    np.testing.assert_array_equal(np_(fl.Squeeze().inverse()(z)), x)
    np.testing.assert_array_equal(np_(fl.Squeeze().inverse().inverse()(x)), z)


def test_reshape_flattens_and_restores():
    x = data((2, 3, 4))
    r = fl.Reshape()
    z = np_(r(x))
    np.testing.assert_array_equal(z, x.reshape(B, 24))
    back = np_(r.inverse()(z))
    assert back.shape == x.shape
    np.testing.assert_array_equal(back, x)


def test_invdense_kernel_is_the_lu_of_an_orthogonal_matrix():
    layer = fl.InvDense(seed=0)
    x = data((2, 2, 5))
    z = np_(layer(x))
    w = np_(layer.kernel())
    np.testing.assert_allclose(w @ w.T, np.eye(5), atol=1e-5)  # rotation at init
    np.testing.assert_allclose(z, x @ w, atol=1e-5)
    p = np_(layer.p)
    np.testing.assert_array_equal(np.sort(p, axis=0)[-1], np.ones(5))
    assert set(np.unique(p)) <= {0.0, 1.0} and p.sum() == 5
    assert set(np.unique(np_(layer.sign_s))) <= {-1.0, 1.0}
    trainable = {w.name for w in layer.trainable_weights}
    assert trainable == {"l", "u", "log_s"}
    # training only moves l, u, log_s; the log-det follows log_s
    perturb(layer, 0.1)
    layer(x)
    assert reported_logdet(layer) == pytest.approx(4 * float(np.sum(np_(layer.log_s))), rel=1e-5)


def test_condactnorm_starts_as_identity_and_uses_x1():
    layer = fl.CondActnorm()
    x = data((2, 2, 4))
    x2, x1 = halves(x)
    np.testing.assert_array_equal(np_(layer([x2, x1])), x2)
    assert reported_logdet(layer) == 0
    perturb(layer, 0.3)
    h = np_(layer.conv(x1))
    mean, log_sigma = h[..., :2], h[..., 2:]
    np.testing.assert_allclose(np_(layer([x2, x1])), (x2 - mean) * np.exp(-log_sigma), atol=1e-5)
    z_other = np_(layer([x2, x1 + 1.0]))  # the prior is conditioned on x1
    assert np.max(np.abs(z_other - np_(layer([x2, x1])))) > 1e-3


# --------------------------------------------------------------------------------------------------
# Actnorm data-dependent init


def actnorm_model():
    inp = keras.Input((2, 2, 3))
    a1 = fl.Actnorm()(inp)
    a2 = fl.Actnorm()(fl.InvDense(seed=0)(a1))
    return keras.Model(inp, [a1, a2])


def test_initialize_actnorms_normalises_each_channel(tmp_path):
    x = np.random.RandomState(0).normal(loc=3.0, scale=5.0, size=(16, 2, 2, 3)).astype("float32")
    model = actnorm_model()
    assert fl.initialize_actnorms(model, x) == 2
    for out in model(x):
        out = np_(out)
        np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), 0, atol=1e-4)
        np.testing.assert_allclose(out.std(axis=(0, 1, 2)), 1, atol=1e-3)
    actnorms = [l for l in model.layers if isinstance(l, fl.Actnorm)]
    assert all(float(np_(l.initialized)) == 1 for l in actnorms)

    # done once: a second call (even on other data) changes nothing
    weights = model.get_weights()
    outputs = [np_(o) for o in model(x)]
    assert fl.initialize_actnorms(model, x * 2 + 1) == 0
    for a, b in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(model(x), outputs):
        np.testing.assert_array_equal(np_(a), b)

    # and not re-done after loading weights into a fresh model
    path = str(tmp_path / "a.weights.h5")
    model.save_weights(path)
    fresh = actnorm_model()
    fresh.load_weights(path)
    assert fl.initialize_actnorms(fresh, x * 2 + 1) == 0
    for a, b in zip(fresh(x), outputs):
        np.testing.assert_array_equal(np_(a), b)
    # whereas a fresh model without loaded weights would be initialised
    assert fl.initialize_actnorms(actnorm_model(), x) == 2


def test_initialize_scales_gives_each_output_unit_variance_and_keeps_the_log_det():
    x = np.random.RandomState(0).normal(scale=[0.003, 1.0, 40.0], size=(64, 3)).astype("float32")
    inp = keras.Input((3,))
    scale = fl.Scale()
    model = keras.Model(inp, scale(inp))
    assert fl.initialize_scales(model, x) == 1
    np.testing.assert_allclose(np_(model(x)).std(axis=0), 1, rtol=1e-3)
    np.testing.assert_allclose(np_(scale.log_scale)[0], -np.log(x.std(axis=0)), rtol=1e-4)
    model(x)
    assert float(np_(model.losses[0])) == pytest.approx(-float(np_(scale.log_scale).sum()), rel=1e-6)
    assert not scale.init_mode  # a later call leaves s alone
    before = np_(scale.log_scale).copy()
    model(x * 5)
    np.testing.assert_array_equal(np_(scale.log_scale), before)


def test_initialize_actnorms_finds_nested_models():
    inner_in = keras.Input((4,))
    inner = keras.Model(inner_in, fl.Actnorm()(inner_in))
    inp = keras.Input((4,))
    model = keras.Model(inp, fl.Scale()(inner(inp)))
    x = np.random.RandomState(1).normal(loc=-2.0, scale=0.5, size=(32, 4)).astype("float32")
    assert fl.initialize_actnorms(model, x) == 1
    out = np_(inner(x))
    np.testing.assert_allclose(out.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(out.std(axis=0), 1, atol=1e-3)


# --------------------------------------------------------------------------------------------------
# UniformNoise


@pytest.mark.parametrize("scale", [-0.01, 1 / 256])
def test_uniform_noise(scale):
    x = data((6, 5))
    noise = fl.UniformNoise(scale)
    np.testing.assert_array_equal(np_(noise(x)), x)
    np.testing.assert_array_equal(np_(noise(x, training=False)), x)
    diff = np_(noise(x, training=True)) - x
    lo, hi = min(scale, 0.0), max(scale, 0.0)
    tol = 1e-6
    assert np.all(diff >= lo - tol) and np.all(diff <= hi + tol)
    assert np.std(diff) > abs(scale) / 10  # really random, spread over the bin
    assert np.mean(diff) == pytest.approx(scale / 2, abs=abs(scale) / 5)

    inp = keras.Input((6, 5))
    model = keras.Model(inp, fl.UniformNoise(scale)(inp))
    np.testing.assert_array_equal(np_(model(x)), x)
    assert np.max(np.abs(np_(model(x, training=True)) - x)) > 0
    assert fl.UniformNoise.from_config(noise.get_config()).scale == scale


# --------------------------------------------------------------------------------------------------
# docs/design.md §7: a model holding layers and their inverses keeps the forward log-dets


def test_model_with_layers_and_their_inverses_reports_forward_logdets():
    inp = keras.Input((8,))
    split, concat = fl.Split(), fl.Concat()
    couple = fl.AffineCouple(mlp(4, 4), mlp(4, 4))
    scale = fl.Scale()
    z = scale(concat(couple(split(inp))))
    x_back = split.inverse()(couple.inverse()(concat.inverse()(scale.inverse()(z))))
    model = keras.Model(inp, [z, x_back])
    perturb(model, 0.3)
    x = data((8,))

    _, back = model(x)
    np.testing.assert_allclose(np_(back), x, atol=1e-5)
    assert len(model.losses) == 2
    x1, _ = halves(x)
    expected = float(np.mean(np.sum(np_(couple.log_scale_model(x1)), axis=-1)))
    expected += float(np.sum(np_(scale.log_scale)))
    assert abs(expected) > 0.05
    assert reported_logdet(model) == pytest.approx(expected, rel=1e-5)

    # the same in a stateless call (the path JAX's fit takes, where a tracked forward layer inside
    # an Inverse would have its losses cleared when the inverse runs)
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    (_, back), _, losses = model.stateless_call(trainable, non_trainable, x, return_losses=True)
    np.testing.assert_allclose(np_(back), x, atol=1e-5)
    assert len(losses) == 2
    assert -sum(float(np_(l)) for l in losses) == pytest.approx(expected, rel=1e-5)

    # running an inverse on its own afterwards leaves the forward layers' losses alone
    couple.inverse()(couple([x1, halves(x)[1]]))
    assert reported_logdet(couple) == pytest.approx(expected - float(np.sum(np_(scale.log_scale))),
                                                    rel=1e-5)

    # the same losses reach the compiled loss in evaluate (back ≈ x, so the MSE term is ~0)
    model.compile(loss=[None, "mse"])
    result = model.evaluate(x, [x, x], verbose=0, return_dict=True)
    assert result["loss"] == pytest.approx(-expected, rel=1e-4, abs=1e-5)


def test_concat_of_a_single_part_round_trips():
    x = np.random.RandomState(0).randn(2, 6).astype("float32")
    inp = keras.Input((6,))
    concat = fl.Concat()
    out = concat([inp])
    np.testing.assert_array_equal(keras.Model(inp, out)(x), x)
    (back,) = concat.inverse()(x)
    np.testing.assert_array_equal(back, x)


# --------------------------------------------------------------------------------------------------
# The Transformer's element-wise chains with their gradients written out (flowkit.kernels)

def _autodiff_and_written(fn, ref, inputs, upstream):
    """(values, gradients) of `fn` (written-out gradient) and of `ref` (plain ops, autodiff) at inputs:
    the gradients are upstreamᵀ ∂f/∂(each input), on whichever backend runs (flowkit.backend.vjp)."""
    from flowkit import backend

    out = []
    for f in (fn, ref):
        xs = [ops.convert_to_tensor(v) for v in inputs]
        grads = []
        for i in range(len(xs)):
            y, pullback = backend.vjp(lambda x_i, i=i: f(*xs[:i], x_i, *xs[i + 1:]), xs[i])
            grads.append(np_(pullback(ops.convert_to_tensor(upstream))))
        out.append((np_(y), grads))
    return out


def test_gelu_layer_norm_and_softmax_gradients_are_autodiffs(float64):
    """gelu, layer_norm and masked_softmax (one fused program each way on TensorFlow) against the same
    formulas in plain ops differentiated by autodiff, in float64: equal values and gradients."""
    rng = np.random.RandomState(0)
    x, up = rng.normal(size=(6, 8)) * 2, rng.normal(size=(6, 8))
    (y, [g]), (y_ref, [g_ref]) = _autodiff_and_written(
        kernels.gelu, lambda v: v * 0.5 * (1 + ops.erf(v / np.sqrt(2))), [x], up)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g, g_ref, rtol=1e-10, atol=1e-12)

    gamma, beta = rng.normal(size=8), rng.normal(size=8)
    keras_norm = keras.layers.LayerNormalization(epsilon=1e-6, dtype="float64")
    keras_norm.build((None, 8))
    keras_norm.set_weights([gamma, beta])
    norm = kernels.layer_norm(1e-6, "float64")

    def ref(v, g_, b_):  # sums over counts: Keras' own means are float32 inside on JAX and PyTorch
        centred = v - ops.sum(v, axis=-1, keepdims=True) / 8
        return centred / ops.sqrt(ops.sum(centred * centred, axis=-1, keepdims=True) / 8 + 1e-6) * g_ + b_

    (y, grads), (y_ref, grads_ref) = _autodiff_and_written(norm, ref, [x * 3 + 1, gamma, beta], up)
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10)
    # Keras' layer and op, the same function (to their float32 insides on JAX and PyTorch)
    tol = 1e-10 if keras.backend.backend() == "tensorflow" else 1e-6
    np.testing.assert_allclose(y, np_(keras_norm(x * 3 + 1)), rtol=tol, atol=tol)
    np.testing.assert_allclose(y, np_(ops.layer_normalization(x * 3 + 1, gamma, beta, epsilon=1e-6)), rtol=tol, atol=tol)
    for a, b in zip(grads, grads_ref):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)

    scores, mask = rng.normal(size=(2, 3, 5, 5)) * 3, ops.convert_to_tensor(tarflow.Attention.causal_mask(5))
    up = rng.normal(size=scores.shape)
    (p, [g]), (p_ref, [g_ref]) = _autodiff_and_written(
        lambda s: kernels.masked_softmax(s, mask), lambda s: ops.softmax(s + mask, axis=-1), [scores], up)
    np.testing.assert_allclose(p, p_ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(g, g_ref, rtol=1e-9, atol=1e-12)
    assert np.all(p[..., 0, 1:] == 0) and np.abs(g).max() > 0.1  # causal; the check is not vacuous


def test_fused_chains_keep_16_bit_outputs_and_compute_wide():
    """Under a 16-bit input the chains return 16 bits, computed in float32: GELU of bfloat16 values
    equals float32 GELU rounded once."""
    x = np.random.RandomState(1).normal(size=(4, 16)).astype("float32")
    xb = ops.cast(x, "bfloat16")
    y = kernels.gelu(xb)
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    wide = np_(kernels.gelu(ops.cast(xb, "float32")))
    np.testing.assert_array_equal(np_(ops.cast(y, "float32")), np_(ops.cast(ops.cast(wide, "bfloat16"), "float32")))
    norm = kernels.layer_norm(1e-6, "bfloat16")(ops.convert_to_tensor(x), ops.ones((16,)), ops.zeros((16,)))
    assert keras.backend.standardize_dtype(norm.dtype) == "bfloat16"
