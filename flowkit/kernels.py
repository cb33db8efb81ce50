"""Fused element-wise kernels with their gradients written out, for TarFlow's causal Transformer, and the
float64-exact mean and matmul the layers share. The kernels exist for speed: each is the element-wise
chain between two matmuls (the 16-bit casts, the float32 arithmetic, the gradient's element-wise work)
as one XLA program per direction on TensorFlow (`flowkit.backend.fused`; plain ops elsewhere), one pass
over memory, while the matmuls stay with oneDNN (per call on one CPU core: GELU 2.62 → 1.65 ms, layer
norm 0.79 → 0.64 ms, masked softmax 1.84 → 1.41 ms; docs/running.md). They compute in float32 whatever
the compute dtype and return that dtype. Each is the textbook formula (tests/test_layers.py checks
values and gradients against autodiff of plain ops in float64):

    gelu(x) = x·Φ(x), Φ(x) = ½(1 + erf(x/√2));  its derivative Φ(x) + x·φ(x)
    layer_norm(ε, dtype)(x, γ, β) = n·γ + β, n = (x − mean x)/√(var x + ε);
        ∂/∂x = (g' − mean g' − n·mean(g'·n))/√(var x + ε) with g' = g·γ
    masked_softmax(s, mask) = p = softmax(s + mask);  ∂/∂s = p ⊙ (g − Σ g·p)

`mean` and `matmul` are ops.mean and ops.matmul that keep float64 in float64 (Keras' JAX and PyTorch
backends compute both in float32 whatever the input), so the float64 Jacobian checks keep their precision.
"""
import functools
import math

import keras
from keras import ops

from flowkit import backend


def is_float64(x):
    return keras.backend.standardize_dtype(x.dtype) == "float64"


def mean(x, axis=None, keepdims=False):
    """ops.mean in x's own precision: Keras' JAX and PyTorch backends average in float32 whatever the
    input (their result type of float64 and float32 is float32), which would cost the float64
    Jacobian checks their precision, so a float64 mean is a sum over the count."""
    x = ops.convert_to_tensor(x)
    if not is_float64(x):
        return ops.mean(x, axis=axis, keepdims=keepdims)
    total = ops.sum(x, axis=axis, keepdims=keepdims)
    return total * ops.cast(ops.size(total), x.dtype) / ops.cast(ops.size(x), x.dtype)


def matmul(a, b):
    """ops.matmul, but float64 stays float64: Keras' PyTorch backend multiplies float64 matrices in
    float32 (its result type again), so float64 goes through an einsum."""
    if is_float64(a):
        return ops.einsum("...ij,...jk->...ik", a, b)
    return ops.matmul(a, b)


def wide(x):
    """x in at least float32 (float64 stays float64)."""
    return x if is_float64(x) else ops.cast(x, "float32")


_fused = backend.fused  # the element-wise chains between the matmuls as one XLA program each


_SQRT_HALF, _INV_SQRT_2PI = 1 / math.sqrt(2), 1 / math.sqrt(2 * math.pi)


def _normal_cdf(f):
    """Φ(f) = ½(1 + erf(f/√2))."""
    return 0.5 + 0.5 * ops.erf(f * _SQRT_HALF)


@_fused
def _gelu(x):
    f = wide(x)
    return ops.cast(f * _normal_cdf(f), x.dtype)


@_fused
def _gelu_grad(x, upstream):
    f = wide(x)
    slope = _normal_cdf(f) + f * ops.exp(-0.5 * ops.square(f)) * _INV_SQRT_2PI
    return ops.cast(ops.cast(upstream, f.dtype) * slope, x.dtype)


@ops.custom_gradient
def gelu(x):
    """GELU(x) = x·Φ(x), Φ(x) = 0.5·(1 + erf(x/√2)) (Hendrycks & Gimpel 2016), exact, computed in float32
    (or float64) and returned in x's dtype. Its derivative Φ(x) + x·φ(x), φ the normal density, is
    written out; each direction is one fused program (`_fused`)."""
    def grad(*args, upstream=None):
        return _gelu_grad(x, args[0] if upstream is None else upstream)
    return _gelu(x), grad


@functools.lru_cache(maxsize=None)
def layer_norm(epsilon, dtype):
    """The function (x, γ, β) -> n·γ + β in `dtype`, n = (x − mean)/√(var + ε) over the last axis (Ba et
    al. 2016), computed in x's dtype (float32: the residual stream). Its gradient is written out: with
    g' = g·γ, ∂/∂x = (g' − mean g' − n·mean(g'·n))/√(var + ε), ∂/∂γ = Σ g·n, ∂/∂β = Σ g over the
    other axes; each direction is one fused program (`_fused`)."""
    def normalized(x):
        centred = x - mean(x, axis=-1, keepdims=True)
        rstd = ops.rsqrt(mean(ops.square(centred), axis=-1, keepdims=True) + epsilon)
        return centred * rstd, rstd

    @_fused
    def forward(x, gamma, beta):
        return ops.cast(normalized(x)[0] * gamma + beta, dtype)

    @_fused
    def backward(x, gamma, upstream):
        n, rstd = normalized(x)
        g = ops.cast(upstream, x.dtype)
        rows = tuple(range(len(x.shape) - 1))
        g_n = g * gamma
        g_x = rstd * (g_n - mean(g_n, axis=-1, keepdims=True) - n * mean(g_n * n, axis=-1, keepdims=True))
        return g_x, ops.sum(g * n, axis=rows), ops.sum(g, axis=rows)

    @ops.custom_gradient
    def norm(x, gamma, beta):
        def grad(*args, upstream=None):
            return backward(x, gamma, args[0] if upstream is None else upstream)
        return forward(x, gamma, beta), grad
    return norm


def _probabilities(scores, mask):
    """softmax(scores + mask) over the last axis, in float32 (or float64)."""
    w = wide(scores)
    return ops.softmax(w + ops.cast(mask, w.dtype), axis=-1)


@_fused
def _softmax(scores, mask):
    return ops.cast(_probabilities(scores, mask), scores.dtype)


@_fused
def _softmax_grad(scores, mask, upstream):
    p = _probabilities(scores, mask)  # again, in float32: cheaper than keeping it
    g = ops.cast(upstream, p.dtype)
    return ops.cast(p * (g - ops.sum(g * p, axis=-1, keepdims=True)), scores.dtype)


@ops.custom_gradient
def masked_softmax(scores, mask):
    """softmax(scores + mask) over the last axis, computed in float32 (or float64), returned in the scores'
    dtype; its gradient p ⊙ (g − Σ g·p) written out; each direction one fused program (`_fused`). The
    mask is a constant: no gradient."""
    def grad(*args, upstream=None):
        return _softmax_grad(scores, mask, args[0] if upstream is None else upstream), None
    return _softmax(scores, mask), grad
