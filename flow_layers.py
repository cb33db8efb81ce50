"""Invertible layers of the "细水长 Flow" articles on Keras 3, one per equation, in the articles' order:
the flow contract (FlowLayer, its Inverse, the compositions Flow and ConditionalFlow), then NICE,
RealNVP and Glow, i-ResNet (with Residual Flows), TarFlow (f-VAEs adds no layer of its own). The
articles' models and their networks are assembled in their scripts: Glow's steps, levels and coupling
network in glow.py, TarFlow's blocks and causal Transformer in tarflow.py.

Contract (docs/design.md §2): `encode` is the encoder direction x -> z with its log-determinant per
example; calling the layer adds the batch mean of −log|det| with `add_loss`; `reverse` computes z -> x;
`inverse()` returns a layer that runs `reverse` on the same variables, and `inverse().inverse()` is the
layer itself.
Only `keras.ops` is used, so the layers run on every Keras backend (TensorFlow, JAX, PyTorch). What
Keras does not offer (vector-Jacobian products for `ResidualFlow`, a loop reverse mode goes through,
a replica's own noise) comes from `flowkit.backend`, the one module that speaks a backend's own API;
the float64-exact mean and matmul from `flowkit.kernels`.
"""
import contextlib
import inspect
import math

import keras
import numpy as np
from keras import ops

from flowkit import backend, kernels


def _constant(value):
    """An initializer returning a fixed array (Keras 3 calls initializers as (shape, dtype))."""
    value = np.asarray(value)

    def init(shape, dtype=None):
        return ops.convert_to_tensor(np.reshape(value, shape), dtype=dtype)

    return init


def _pixels(x):
    """Number of positions sharing one per-channel parameter: H·W for images, 1 for vectors."""
    return math.prod(x.shape[1:-1])


def _per_image_sum(x):
    return ops.sum(x, axis=tuple(range(1, len(x.shape))))


def flow_dtype(kwargs):
    """Flow layers compute in their variables' dtype: float32 under a mixed policy ("mixed_bfloat16",
    "mixed_float16"), floatx otherwise. So the data path x -> z, every log-det, the prior and the
    inverse stay in float32, and only the coupling networks (where the FLOPs are) run in 16 bits; a
    coupling inverts exactly all the same, since its reverse recomputes m(x1) from the same x1."""
    kwargs.setdefault("dtype", keras.config.dtype_policy().variable_dtype)
    return kwargs


# --- the flow contract: a layer, its inverse, a composition ---------------------------------------

class FlowLayer(keras.layers.Layer):
    """Base of every invertible layer z = f(x), whose log-det enters log q(x) = −(D/2)·log 2π − ½‖f(x)‖²
    + log|det ∂f/∂x| (NICE eq. 06). A subclass defines

    - `encode(inputs, training=None) -> (outputs, log_det)`: the encoder direction x -> z and
      log|det ∂z/∂x| per example (shape (batch,)), or one scalar shared by every example, or the
      integer 0 for a volume-preserving step;
    - `reverse(outputs) -> inputs`: the inverse map z -> x.

    Calling the layer runs `encode` (the articles' forward pass; `forward` is PyTorch's own method
    name, which Keras' torch layers route every call through) and adds the batch mean of −log|det|
    with `add_loss`, so that `fit` minimises −log q(x) with the prior as the compiled loss. Called with
    `return_log_det=True` it returns (outputs, log_det per example) instead and adds nothing: a
    `Flow` sums its steps' log-dets that way and adds them once, and a script gets a per-image NLL.
    `inverse()` is a layer running `reverse` on the same variables (docs/design.md §2).
    """

    def __init__(self, **kwargs):
        super().__init__(**flow_dtype(kwargs))

    def encode(self, inputs, training=None):
        raise NotImplementedError

    def reverse(self, inputs):
        raise NotImplementedError

    def call(self, inputs, training=None, return_log_det=False):
        outputs, log_det = self.encode(inputs, training=training)
        if return_log_det:
            first = keras.tree.flatten(outputs)[0]
            return outputs, ops.zeros(ops.shape(first)[:1], dtype=first.dtype) + log_det
        if not (isinstance(log_det, int) and log_det == 0):
            self.add_loss(-kernels.mean(log_det))
        return outputs

    def inverse(self):
        return Inverse(self)


class Inverse(keras.layers.Layer):
    """x = f⁻¹(z), the decoder direction of a flow layer (NICE eq. 03: x = g(z) ⇔ z = f(x)), reading
    the forward layer's variables (never a copy).

    The forward layer is kept as an untracked reference: tracking it would make Keras treat it as a
    sub-layer whose losses are cleared when the inverse runs (docs/design.md §7).
    """

    def __init__(self, flow, **kwargs):
        super().__init__(**flow_dtype(kwargs))
        object.__setattr__(self, "flow", flow)
        self.built = True  # its state is the forward layer's: nothing to build

    def call(self, inputs, **options):
        """The forward layer's `reverse(inputs, **options)`: options of the inverse call (TarBlock's
        `guidance` and `use_cache`) pass through, e.g. `flow.inverse()(z, guidance=3.0)`."""
        return self.flow.reverse(inputs, **options)

    def inverse(self):
        return self.flow

    def get_config(self):
        return {**super().get_config(), "flow": keras.saving.serialize_keras_object(self.flow)}

    @classmethod
    def from_config(cls, config):
        config["flow"] = keras.saving.deserialize_keras_object(config["flow"])
        return cls(**config)


class Flow(FlowLayer):
    """A composition of flow layers as one flow layer: z = f_n(… f_1(x)), log-dets add (NICE eq. 10–11).

    Its inverse is the articles' decoder: the same layers, each one's `.inverse()`, in reverse order.
    A step may pass a pair [x1, x2] to the next (Split -> AffineCouple -> Concat).
    """

    def __init__(self, steps, **kwargs):
        super().__init__(**kwargs)
        for step in steps:
            if not isinstance(step, FlowLayer):
                raise TypeError(f"a Flow holds flow layers, not {type(step).__name__}")
        self.steps = list(steps)

    def _split_condition(self, inputs):
        """(x, condition) of the flow's inputs and the input a step gets: here no condition, x alone."""
        return inputs, None

    def _feed(self, step, x, condition):
        return x

    def encode(self, inputs, training=None):
        x, condition = self._split_condition(inputs)
        total = 0
        for step in self.steps:
            x, log_det = step(self._feed(step, x, condition), training=training, return_log_det=True)
            total = total + log_det
        return x, total

    def reverse(self, inputs, **options):
        """The steps' inverses in reverse order; `options` (TarBlock's `guidance`, `use_cache`) go to each
        step whose `reverse` takes them, by name (a nested Flow takes them all)."""
        z, condition = self._split_condition(inputs)
        for step in reversed(self.steps):
            takes = inspect.signature(step.reverse).parameters
            given = options if any(p.kind == p.VAR_KEYWORD for p in takes.values()) else \
                {name: value for name, value in options.items() if name in takes}
            z = step.inverse()(self._feed(step, z, condition), **given)
        return z

    def get_config(self):
        return {**super().get_config(), "steps": [keras.saving.serialize_keras_object(s) for s in self.steps]}

    @classmethod
    def from_config(cls, config):
        config["steps"] = [keras.saving.deserialize_keras_object(s) for s in config["steps"]]
        return cls(**config)


class ConditionalFlow(Flow):
    """z = f_n(… f_1(x; y) …; y), a Flow on [x, y], y one integer label per example (class-conditional
    TarFlow): every step with `classes` (a conditional TarBlock) gets [x, y], the others x alone; the
    output is z. Its inverse takes [z, y] and hands y to the same steps."""

    def _split_condition(self, inputs):
        return inputs[0], inputs[1]

    def _feed(self, step, x, y):
        return [x, y] if getattr(step, "classes", 0) else x


def children(layer):
    """The layers a layer holds as attributes, alone or in lists (a flow layer's steps and networks, a
    Transformer's layers); none for an Inverse, whose forward layer is a reference, not a part."""
    found = []
    # PyTorch's Module keeps a layer held alone in `_modules`, not in the instance's __dict__
    held = {**vars(layer), **(getattr(layer, "_modules", None) or {})}
    for name, value in ([] if isinstance(layer, Inverse) else held.items()):
        if name.startswith("_"):
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, keras.layers.Layer) and all(v is not f for f in found):
                found.append(v)
    return found


def flow_layers_of(model):
    """Every layer inside a model or a layer, nested ones included: a Model's `layers`, another
    layer's `children`, recursively (Keras 3 has no public recursive listing)."""
    found, todo = [], [model]
    while todo:
        layer = todo.pop()
        inner = layer.layers if isinstance(layer, keras.Model) else children(layer)
        for child in reversed(inner):
            if all(child is not f for f in found):
                found.append(child)
                todo.append(child)
    return found


# --- NICE ("NICE · 流模型的基本概念与实现"): input noise, shuffle, split, additive coupling, scale -----------

class UniformNoise(keras.layers.Layer):
    """x + scale·U(0,1) while training, identity otherwise (the articles' input noise).

    NICE uses scale = -0.01 (x/255 − 0.01·U), Glow scale = 1/256. Not a flow step: the decoder
    replay skips it. Float32 under a mixed policy: in bfloat16 a noise of 1/256 on values near 1
    would round away. Under a distribution strategy each replica draws its own noise (`flowkit.backend.uniform`).
    """

    def __init__(self, scale, **kwargs):
        super().__init__(**flow_dtype(kwargs))
        self.scale = float(scale)
        self.seed = keras.random.SeedGenerator()

    def call(self, x, training=None):
        if training:
            return x + self.scale * backend.uniform(ops.shape(x), x.dtype, self.seed)
        return x

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


class Permute(FlowLayer):
    """z_i = x_π(i) on the last axis: NICE's Shuffle (π the reversal, "交错前进") or RealNVP's random
    shuffle.

    Log-det 0. The indices live in a non-trainable weight so a saved model reloads the same flow.
    """

    def __init__(self, mode="reverse", seed=None, **kwargs):
        super().__init__(**kwargs)
        if mode not in ("reverse", "random"):
            raise ValueError(f"Permute mode must be 'reverse' or 'random', not {mode!r}")
        self.mode = mode
        self.seed = seed

    def build(self, input_shape):
        d = input_shape[-1]
        if self.mode == "reverse":
            idxs = np.arange(d)[::-1]
        else:
            rng = np.random if self.seed is None else np.random.RandomState(self.seed)
            idxs = rng.permutation(d)
        self.idxs = self.add_weight(shape=(d,), dtype="int32", trainable=False,
                                    initializer=_constant(idxs), name="idxs")

    def encode(self, x, training=None):
        return ops.take(x, self.idxs, axis=-1), 0

    def reverse(self, z):
        return ops.take(z, ops.argsort(self.idxs), axis=-1)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode, "seed": self.seed}


def _split(x, sizes, interleave):
    if interleave:
        pairs = ops.reshape(x, (-1, *x.shape[1:-1], x.shape[-1] // 2, 2))
        return [pairs[..., 0], pairs[..., 1]]
    if len(sizes) == 1:
        return [x]
    return ops.split(x, np.cumsum(sizes)[:-1].tolist(), axis=-1)


def _concat(parts, interleave):
    if interleave:
        pairs = ops.stack(parts, axis=-1)
        return ops.reshape(pairs, (-1, *pairs.shape[1:-2], pairs.shape[-2] * 2))
    return ops.concatenate(parts, axis=-1)


class Split(FlowLayer):
    """x -> [x1, x2], the partition of NICE eq. 07, along the last axis: halves (RealNVP/Glow channels)
    or, with interleave=True, even and odd indices (NICE's SplitVector, "交错"). Log-det 0; the inverse
    is the concatenation."""

    def __init__(self, interleave=False, **kwargs):
        super().__init__(**kwargs)
        self.interleave = interleave

    def encode(self, x, training=None):
        d = x.shape[-1]
        return _split(x, [d // 2, d - d // 2], self.interleave), 0

    def reverse(self, parts):
        return _concat(parts, self.interleave)

    def get_config(self):
        return {**super().get_config(), "interleave": self.interleave}


class Concat(FlowLayer):
    """[x1, x2, ...] -> x = (x1, x2, ...) along the last axis (the articles' Concat / ConcatVector); the
    inverse splits back into the sizes seen when built. Log-det 0."""

    def __init__(self, interleave=False, **kwargs):
        super().__init__(**kwargs)
        self.interleave = interleave

    def build(self, input_shapes):
        self.sizes = [s[-1] for s in input_shapes]

    def encode(self, parts, training=None):
        return _concat(parts, self.interleave), 0

    def reverse(self, x):
        return _split(x, self.sizes, self.interleave)

    def get_config(self):
        return {**super().get_config(), "interleave": self.interleave}


class AffineCouple(FlowLayer):
    """[x1, x2] -> [x1, h2] with h2 = exp(log s(x1)) ⊗ x2 + t(x1): RealNVP's affine coupling (eq. 01),
    log-det Σ log s. Without a log-scale network it is NICE's additive coupling h2 = x2 + m(x1)
    (NICE eq. 07, log-det 0). With `joint` one network gives both, [log s, t] along its last axis
    (Glow's NN(x1), the article's f).

    subtract=True makes the encoder h2 = x2 − m(x1), NICE's inverse eq. (09), as the NICE article's
    code does: m ends in a ReLU, so m(x1) ≥ 0, and the decoder x2 = h2 + m(x1) then leans towards
    positive pixels, which suits images in [0, 1].
    The networks are ordinary Keras models passed in (the original's CoupleWrapper).
    """

    def __init__(self, shift_model, log_scale_model=None, subtract=False, joint=False, **kwargs):
        super().__init__(**kwargs)
        self.shift_model = shift_model
        self.log_scale_model = log_scale_model
        self.subtract = subtract
        self.joint = bool(joint)

    def _scale_shift(self, x1):
        """(log s or None, t) of x1, in x1's dtype (the networks compute in 16 bits under mixed precision)."""
        out = ops.cast(self.shift_model(x1), x1.dtype)
        if self.joint:
            log_s, t = ops.split(out, 2, axis=-1)
        else:
            log_s = None if self.log_scale_model is None else ops.cast(self.log_scale_model(x1), x1.dtype)
            t = out
        return log_s, (-t if self.subtract else t)

    def encode(self, inputs, training=None):
        x1, x2 = inputs
        log_s, t = self._scale_shift(x1)
        if log_s is None:
            return [x1, x2 + t], 0
        return [x1, x2 * ops.exp(log_s) + t], _per_image_sum(log_s)

    def reverse(self, inputs):
        h1, h2 = inputs
        log_s, t = self._scale_shift(h1)
        x2 = h2 - t
        return [h1, x2 if log_s is None else x2 * ops.exp(-log_s)]

    def get_config(self):
        ser = keras.saving.serialize_keras_object
        return {**super().get_config(), "shift_model": ser(self.shift_model),
                "log_scale_model": ser(self.log_scale_model), "subtract": self.subtract, "joint": self.joint}

    @classmethod
    def from_config(cls, config):
        de = keras.saving.deserialize_keras_object
        config["shift_model"] = de(config["shift_model"])
        config["log_scale_model"] = de(config["log_scale_model"])
        return cls(**config)


class Scale(FlowLayer):
    """z = exp(s) ⊗ h, NICE's scale layer (eq. 15), log-det Σ s (× H·W on images). The original
    initialises s with glorot_normal on a (1, D) kernel; so do we.

    `initialize_scales` sets s from a batch instead, s = −log std(h) per dimension, so that each
    output has unit variance: Glow's Actnorm init without the bias (`nice.py --scale-init data`)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.init_mode = False

    def build(self, input_shape):
        self.log_scale = self.add_weight(shape=(1, input_shape[-1]), initializer="glorot_normal",
                                         name="log_scale")

    def encode(self, x, training=None):
        if self.init_mode:
            std = ops.std(x, axis=tuple(range(len(x.shape) - 1)))
            self.log_scale.assign(ops.reshape(-ops.log(std + 1e-6), self.log_scale.shape))
        return x * ops.exp(self.log_scale), _pixels(x) * ops.sum(self.log_scale)

    def reverse(self, z):
        return z * ops.exp(-self.log_scale)


def initialize_scales(model, x, training=True):
    """Data-dependent init of NICE's Scale layers (Glow's ActNorm init without the bias, see
    `initialize_actnorms`): one eager pass over the batch x sets each s = −log std. In training mode by
    default, so the article's input noise is in the statistics: without it an always-black pixel has
    std 0 and s would be huge. Returns how many were set."""
    return _init_pass(model, x, [l for l in flow_layers_of(model) if isinstance(l, Scale)], training)


def _init_pass(model, x, todo, training):
    """One eager call of `model` on x with the layers `todo` in their init mode; returns how many."""
    if not todo:
        return 0
    for layer in todo:
        layer.init_mode = True
    try:
        model(x, training=training)
    finally:
        for layer in todo:
            layer.init_mode = False
    return len(todo)


# --- RealNVP and Glow ("RealNVP 与 Glow · 流模型的传承与升华") ----------------------------------------------

class Logit(FlowLayer):
    """z = logit(y), y = α + (1 − 2α)·x, for x in [0, 1] (RealNVP's logit transform, Dinh et al. 2017
    §4.1; α = 1e-6 on MNIST in MAF and Residual Flows); log-det Σ [log(1 − 2α) − log y − log(1 − y)].

    The dequantised background, x in [0, 1/256), becomes a spread of several units instead of a sliver:
    a Lipschitz-bounded residual block, which can squeeze a dimension by at most a fixed factor, need
    not squeeze it that hard. The inverse is x = (σ(z) − α)/(1 − 2α)."""

    def __init__(self, alpha=1e-6, **kwargs):
        super().__init__(**kwargs)
        if not 0 < alpha < 0.5:
            raise ValueError(f"alpha must lie in (0, 0.5), not {alpha!r}")
        self.alpha = float(alpha)

    def encode(self, x, training=None):
        y = self.alpha + (1 - 2 * self.alpha) * x
        log_y, log_1my = ops.log(y), ops.log1p(-y)
        log_det = _per_image_sum(math.log(1 - 2 * self.alpha) - log_y - log_1my)
        return log_y - log_1my, log_det

    def reverse(self, z):
        return (ops.sigmoid(z) - self.alpha) / (1 - 2 * self.alpha)

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha}


class Squeeze(FlowLayer):
    """(h, w, c) -> (h/2, w/2, 4c): each 2×2 patch becomes channels (RealNVP, "引入卷积").

    Splits and permutations then act on channels while convolutions keep spatial locality. Log-det 0.
    """

    def encode(self, x, training=None):
        h, w, c = x.shape[1:]
        x = ops.reshape(x, (-1, h // 2, 2, w // 2, 2, c))
        x = ops.transpose(x, (0, 1, 3, 5, 2, 4))
        return ops.reshape(x, (-1, h // 2, w // 2, 4 * c)), 0

    def reverse(self, z):
        h, w, c = z.shape[1:]
        z = ops.reshape(z, (-1, h, w, c // 4, 2, 2))
        z = ops.transpose(z, (0, 1, 4, 2, 5, 3))
        return ops.reshape(z, (-1, 2 * h, 2 * w, c // 4))


class CheckerSplit(FlowLayer):
    """(h, w, c) -> [x1, x2]: RealNVP's spatial checkerboard mask (Dinh et al. 2016, §3.4; the article's
    "棋盘式 mask"): x1 = the squares with (row + column) % 2 == parity, x2 = the others, each packed
    to (h, w/2, c) by taking one square of every horizontal pair. Log-det 0; the inverse puts the
    squares back. Shapes are read at run time, so the layer also works inside a size-agnostic
    convolutional network (RealNVP's conditioner sees b ⊙ x on the full grid: `glow.coupling_net`).
    """

    def __init__(self, parity=0, **kwargs):
        super().__init__(**kwargs)
        if parity not in (0, 1):
            raise ValueError(f"CheckerSplit parity must be 0 or 1, not {parity!r}")
        self.parity = parity

    def _swap(self, x):
        """True on the rows where x1 is the second square of each pair, broadcast against (B, h, w/2, c)."""
        h = ops.shape(x)[1]
        return ops.reshape(ops.arange(h) % 2 != self.parity, (1, -1, 1, 1))

    def encode(self, x, training=None):
        # strided slices, not a reshape to (h, w/2, 2, c): JAX's shape inference cannot prove that
        # reshape whole when w is unknown (a size-agnostic network's symbolic input)
        w = ops.shape(x)[2]
        first, second = x[:, :, 0:w - 1:2], x[:, :, 1:w:2]
        swap = self._swap(x)
        return [ops.where(swap, second, first), ops.where(swap, first, second)], 0

    def reverse(self, parts):
        x1, x2 = parts
        h, half, c = ops.shape(x1)[1:]
        swap = self._swap(x1)
        pairs = ops.stack([ops.where(swap, x2, x1), ops.where(swap, x1, x2)], axis=-2)
        return ops.reshape(pairs, (-1, h, 2 * half, c))

    def get_config(self):
        return {**super().get_config(), "parity": self.parity}


class CheckerConcat(CheckerSplit):
    """[x1, x2] -> x: CheckerSplit's inverse as a step of its own (the squares put back). Log-det 0."""

    def encode(self, parts, training=None):
        return CheckerSplit.reverse(self, parts), 0

    def reverse(self, x):
        return CheckerSplit.encode(self, x)[0]


class Reshape(FlowLayer):
    """z = vec(x): each example flattened to a vector (the Glow script's Reshape); the inverse restores
    the shape seen when built. Log-det 0."""

    def build(self, input_shape):
        self.in_shape = tuple(input_shape[1:])

    def encode(self, x, training=None):
        return ops.reshape(x, (-1, math.prod(x.shape[1:]))), 0

    def reverse(self, z):
        return ops.reshape(z, (-1, *self.in_shape))


class Actnorm(FlowLayer):
    """z = (x + b) ⊗ exp(log s), per channel: Glow's ActNorm z' = (z − μ)/σ (article "ActNorm"), NICE's
    scale layer generalised; log-det H·W·Σ log s.

    Glow initialises b and log s from the first batch so that each channel's output has mean 0 and
    variance 1 (the article notes the original code skipped this; we do it, see `initialize_actnorms`).
    `initialized` is a weight, so a model loaded from saved weights is not initialised again.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.init_mode = False

    def build(self, input_shape):
        c = input_shape[-1]
        self.log_scale = self.add_weight(shape=(c,), initializer="zeros", name="log_scale")
        self.bias = self.add_weight(shape=(c,), initializer="zeros", name="bias")
        self.initialized = self.add_weight(shape=(), initializer="zeros", trainable=False,
                                           name="initialized")

    def encode(self, x, training=None):
        if self.init_mode:
            axes = tuple(range(len(x.shape) - 1))
            self.bias.assign(-kernels.mean(x, axis=axes))
            self.log_scale.assign(-ops.log(ops.std(x, axis=axes) + 1e-6))
            self.initialized.assign(1.0)
        return (x + self.bias) * ops.exp(self.log_scale), _pixels(x) * ops.sum(self.log_scale)

    def reverse(self, z):
        return z * ops.exp(-self.log_scale) - self.bias


class InvDense(FlowLayer):
    """Glow's invertible 1×1 convolution z = x W on the last axis, with W = P L (U + diag(sign·exp(log s)))
    (article "置换矩阵", Glow eq. 10): P, L, U from the LU decomposition of a random orthogonal matrix;
    P and the signs fixed, L unit lower-triangular, U strictly upper-triangular and log s trained.
    Log-det H·W·Σ log s. W is assembled in `call` so it follows training.
    """

    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed

    def build(self, input_shape):
        import scipy.linalg

        c = input_shape[-1]
        rng = np.random if self.seed is None else np.random.RandomState(self.seed)
        w = np.linalg.qr(rng.randn(c, c))[0]
        p, l, u = scipy.linalg.lu(w)
        s = np.diag(u)

        def weight(name, value, trainable=True):
            return self.add_weight(shape=np.shape(value), initializer=_constant(value),
                                   trainable=trainable, name=name)

        self.p = weight("p", p, trainable=False)
        self.l = weight("l", np.tril(l, -1))
        self.u = weight("u", np.triu(u, 1))
        self.sign_s = weight("sign_s", np.sign(s), trainable=False)
        self.log_s = weight("log_s", np.log(np.abs(s)))

    def kernel(self):
        eye = ops.eye(self.l.shape[0], dtype=self.l.dtype)
        lower = ops.tril(self.l, -1) + eye
        upper = ops.triu(self.u, 1) + eye * (self.sign_s * ops.exp(self.log_s))
        return kernels.matmul(self.p, kernels.matmul(lower, upper))

    def encode(self, x, training=None):
        return kernels.matmul(x, self.kernel()), _pixels(x) * ops.sum(self.log_s)

    def reverse(self, z):
        return kernels.matmul(z, ops.inv(self.kernel()))

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


class CondActnorm(FlowLayer):
    """[x2, x1] -> z' = (x2 − μ(x1)) ⊗ exp(−log σ(x1)): the conditional prior of a multi-scale output
    (RealNVP/Glow, article eq. 03–05), "a conditional ActNorm". μ and log σ come from a zero-initialised
    3×3 convolution of the half x1 that stays in the flow, so the layer starts as the identity.
    Log-det −Σ log σ. The inverse takes [z', x1] and returns x2.
    """

    def build(self, input_shapes):
        x2_shape, x1_shape = input_shapes
        self.channels = x2_shape[-1]
        self.conv = keras.layers.Conv2D(2 * self.channels, 3, padding="same", dtype=self.dtype_policy,
                                        kernel_initializer="zeros", name="mean_log_scale")
        self.conv.build(x1_shape)

    def _mean_log_scale(self, x1):
        h = self.conv(x1)
        return h[..., :self.channels], h[..., self.channels:]

    def encode(self, inputs, training=None):
        x2, x1 = inputs
        mean, log_sigma = self._mean_log_scale(x1)
        return (x2 - mean) * ops.exp(-log_sigma), -_per_image_sum(log_sigma)

    def reverse(self, inputs):
        z, x1 = inputs
        mean, log_sigma = self._mean_log_scale(x1)
        return z * ops.exp(log_sigma) + mean


class MultiScale(FlowLayer):
    """A level's exit in the multi-scale architecture (RealNVP; the article's "多尺度结构", eq. 03–05):
    x -> [x1, x2] by channel halves; x2 leaves the flow through its conditional prior
    z2 = CondActnorm([x2, x1]), flattened; x1 goes on through `inner`, the rest of the flow (the next
    levels, ending in a flat z1); z = [z2, z1]. Log-det: the prior's plus inner's.
    The inverse splits z, recovers x1 = inner⁻¹(z1) first, then x2 from the prior given x1.
    """

    def __init__(self, inner, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner
        self.split, self.prior = Split(name="split"), CondActnorm(name="cond_actnorm")
        self.flat, self.concat = Reshape(name="flatten"), Concat(name="concat")

    def encode(self, x, training=None):
        x1, x2 = self.split(x)
        z2, log_det2 = self.prior([x2, x1], return_log_det=True)
        z1, log_det1 = self.inner(x1, training=training, return_log_det=True)
        return self.concat([self.flat(z2), z1]), log_det1 + log_det2

    def reverse(self, z):
        z2, z1 = self.concat.inverse()(z)
        x1 = self.inner.inverse()(z1)
        x2 = self.prior.inverse()([self.flat.inverse()(z2), x1])
        return self.split.inverse()([x1, x2])

    def get_config(self):
        return {**super().get_config(), "inner": keras.saving.serialize_keras_object(self.inner)}

    @classmethod
    def from_config(cls, config):
        config["inner"] = keras.saving.deserialize_keras_object(config["inner"])
        return cls(**config)


def initialize_actnorms(model, x):
    """Glow's data-dependent init: one eager forward pass over the batch x, in which each Actnorm not
    yet initialised sets itself from the data it receives (upstream ones already normalised).

    Eager and outside `fit`, the one way that works on every backend, with XLA and under a
    distribution strategy (docs/design.md §7). Returns how many layers were initialised.
    """
    todo = [l for l in flow_layers_of(model)
            if isinstance(l, Actnorm) and (not l.built or float(ops.convert_to_numpy(l.initialized)) == 0)]
    return _init_pass(model, x, todo, training=False)


# --- invertible ResNet and Residual Flows (Behrmann et al. 2019; Chen et al. 2019) ----------------

class _SpectralNorm(keras.layers.Layer):
    """Shared part of the spectrally normalised layers: the kernel is used as W / max(1, σ/c)
    (i-ResNet §3, "soft" normalisation), where σ = `sigma()` ≥ the norm of the layer's linear map, so
    that map has norm ≤ c < 1 at every call, training steps included (up to the compute dtype's rounding).

    i-ResNet estimates σ by power iteration, which gives σ̂ ≤ σ: the map's norm is c·σ/σ̂ > c while σ̂
    lags the kernel (after 3 MNIST epochs at the default learning rate a 3×3 convolution was used at
    1.13·c). Here σ is exact for a dense layer or a 1×1 convolution (the kernel's largest singular
    value) and an upper bound for a k×k convolution (SpectralConv2D: 0.2–0.3 % above on MNIST's 14×14
    stage, ~2 % on its 7×7 one). It is computed from the kernel at each call, in the variable dtype,
    and differentiated through."""

    held_kernel = None  # within _held_kernels: the normalised kernel, computed once for a block's call

    def __init__(self, coeff=0.9, **kwargs):
        super().__init__(**kwargs)
        if not 0 < coeff:
            raise ValueError(f"coeff must be positive, not {coeff!r}")
        self.coeff = float(coeff)

    def sigma(self):
        return self._norm(ops.cast(self.kernel, self.variable_dtype))

    def normalized_kernel(self):
        ratio = self.sigma() / self.coeff
        scale = ops.where(ratio > 1, ratio, ops.ones_like(ratio))  # not ops.maximum: float32 inside on PyTorch
        return self.kernel / ops.cast(scale, self.kernel.dtype)

    def call(self, x):
        kernel = self.normalized_kernel() if self.held_kernel is None else self.held_kernel
        return self._apply(x, kernel) + self.bias

    def get_config(self):
        return {**super().get_config(), "coeff": self.coeff}


@contextlib.contextmanager
def _held_kernels(model):
    """Within the `with`, each spectrally normalised layer of `model` uses the kernel W / max(1, σ/c)
    computed on entering (the weights do not change meanwhile): the SVDs once, not at every call. A
    fixed-point inverse's iterations then cost a few convolutions each (eagerly, the SVDs were most of
    its time), and a log-det's vector-Jacobian products go back through g alone, not through the SVDs
    to weights they do not ask for (most of a traced estimator's graph). The same numbers: the same
    tensor, computed as the layer's call computes it, and a training step's gradient still reaches the
    weights through it. Not under a mixed policy: there the call reads its kernel autocast to 16 bits."""
    layers = [l for l in flow_layers_of(model) if isinstance(l, _SpectralNorm) and l.compute_dtype == l.variable_dtype]
    for layer in layers:
        object.__setattr__(layer, "held_kernel", layer.normalized_kernel())  # a plain tensor, untracked
    try:
        yield
    finally:
        for layer in layers:
            object.__setattr__(layer, "held_kernel", None)


def _largest_singular_value(matrices):
    return ops.max(ops.svd(matrices, compute_uv=False))


class LipSwish(keras.layers.Layer):
    """LipSwish(x) = x·σ(βx) / 1.1 (Residual Flows, Chen et al. 2019, §4), β = softplus(b) ≥ 0 learned per
    channel. d/dx x·σ(βx) = σ(t) + t·σ(t)(1 − σ(t)) at t = βx lies in [−0.0998, 1.0998] whatever β, so
    the activation is 1-Lipschitz; unlike ELU its derivative does not saturate at 0 for negative x."""

    def build(self, input_shape):
        self.b = self.add_weight(shape=(input_shape[-1],), initializer=keras.initializers.Constant(0.5), name="b")

    def call(self, x):
        beta = ops.cast(ops.softplus(self.b), x.dtype)
        return x * ops.sigmoid(beta * x) / 1.1


class SpectralDense(_SpectralNorm):
    """Dense layer x W + b with ‖W‖₂ ≤ c (soft spectral normalisation, see _SpectralNorm)."""

    def __init__(self, units, coeff=0.9, **kwargs):
        super().__init__(coeff, **kwargs)
        self.units = int(units)

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), initializer="glorot_uniform",
                                      name="kernel")
        self.bias = self.add_weight(shape=(self.units,), initializer="zeros", name="bias")

    def _norm(self, kernel):
        return _largest_singular_value(kernel)

    def _apply(self, x, kernel):
        return kernels.matmul(x, kernel)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


class SpectralConv2D(_SpectralNorm):
    """y = K ∗ x + b with max_ω ‖K̂(ω)‖₂ ≤ c (soft spectral normalisation, i-ResNet §3): a convolution
    (stride 1, "same" zero padding, odd kernel size k) whose norm *as an operator on its (H, W, C_in)
    input* is ≤ c; the layer needs H and W when built.

    The kernel reshaped to a matrix is not that operator. The zero-padded convolution on H×W is a
    corner of the circular one on an (H + k//2)×(W + k//2) grid (no tap wraps onto the image), which
    the 2-D DFT block-diagonalises (Sedghi et al. 2019): its norm, max over the grid's frequencies ω
    of ‖K̂(ω)‖₂, bounds ours from above (exactly ours for k = 1), tighter the larger the image."""

    def __init__(self, filters, kernel_size, coeff=0.9, **kwargs):
        super().__init__(coeff, **kwargs)
        self.filters, self.kernel_size = int(filters), int(kernel_size)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"SpectralConv2D needs an odd kernel size, not {kernel_size}")

    def build(self, input_shape):
        h, w, c = input_shape[1:]
        if h is None or w is None:
            raise ValueError("SpectralConv2D needs the input's height and width: its norm depends on them")
        k = self.kernel_size
        self.kernel = self.add_weight(shape=(k, k, c, self.filters), initializer="glorot_uniform", name="kernel")
        self.bias = self.add_weight(shape=(self.filters,), initializer="zeros", name="bias")
        self.image_size = (int(h), int(w))

    def _norm(self, kernel):
        k = self.kernel_size
        if k == 1:
            return _largest_singular_value(kernel[0, 0])

        def cos_sin(n):  # of ω·a, for the n frequencies ω = 2πm/n of one axis and the taps a
            angles = 2 * np.pi * np.outer(np.arange(n), np.arange(k)) / n
            return ops.cast(np.cos(angles), kernel.dtype), ops.cast(np.sin(angles), kernel.dtype)

        def mix(a, b):
            return ops.einsum("ia,jb,abcd->ijcd", a, b, kernel)

        # K̂(ω) = Σ_ab K_ab e^{−i(ω₁a + ω₂b)} = re + i·im; the real [[re, −im], [im, re]] has its
        # singular values, each twice
        (c1, s1), (c2, s2) = [cos_sin(n + k // 2) for n in self.image_size]
        re, im = mix(c1, c2) - mix(s1, s2), -mix(s1, c2) - mix(c1, s2)
        blocks = ops.concatenate([ops.concatenate([re, -im], -1), ops.concatenate([im, re], -1)], -2)
        return _largest_singular_value(ops.reshape(blocks, (-1, *blocks.shape[2:])))

    def _apply(self, x, kernel):
        return ops.conv(x, kernel, strides=1, padding="same")

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size}


try:  # Keras' own test for its shape-inference pass (compute_output_spec); no public name in Keras 3.15
    from keras.src.backend.common.symbolic_scope import in_symbolic_scope as _inferring_shapes
except ImportError:  # another Keras: that pass runs a ResidualFlow in full, only slower
    def _inferring_shapes():
        return False


def banach_iterations(lipschitz, first_step, tol):
    """Fixed-point iterations after which ‖x_k − x*‖ ≤ tol by Banach's bound
    ‖x_k − x*‖ ≤ L^k / (1 − L) · ‖x_1 − x_0‖ (first_step = ‖x_1 − x_0‖ = ‖g(y)‖)."""
    if first_step <= 0:
        return 0
    return max(0, math.ceil(math.log(tol * (1 - lipschitz) / first_step) / math.log(lipschitz)))


def _series_term(pullback, v, k, w):
    """(w·J, (−1)^{k+1}/k · vᵀ J^k v) from w = vᵀ J^{k−1}: the k-th term of log det(I + J) = Σ_{k≥1}
    (−1)^{k+1} tr(J^k)/k by Hutchinson's estimator tr(J^k) ≈ vᵀ J^k v, per example."""
    w = pullback(w)
    sign = 1.0 - 2.0 * ops.cast((k + 1) % 2, v.dtype)
    return w, sign / ops.cast(k, v.dtype) * ops.sum(w * v, axis=tuple(range(1, len(v.shape))))


def _truncated_series(pullback, v, terms):
    """Σ_{k=1}^{terms} (−1)^{k+1} vᵀ J^k v / k: i-ResNet's log-det estimate (eq. 6), biased."""
    total, w = 0.0, v
    for k in range(1, terms + 1):
        w, t = _series_term(pullback, v, k, w)
        total = total + t
    return total


def _roulette_series(pullback, v, terms, p, u, max_extra):
    """Σ_{k=1}^{N} (−1)^{k+1} vᵀ J^k v / (k·P(N ≥ k)), N = terms + G, P(G ≥ j) = (1 − p)^j: Residual Flows'
    Russian roulette (Chen et al. 2019, eq. 6), unbiased; G = ⌊log u / log(1 − p)⌋ from u in (0, 1], drawn
    once per batch. At most terms + max_extra products (P(N > terms + 40) = (1 − p)^40, 1e-12 at p = 0.5):
    flowkit.backend.bounded_while, as JAX differentiates only loops of known length."""
    n = terms + ops.cast(ops.floor(ops.log(u) / math.log(1 - p)), "int32")

    def body(k, w, total):
        w, t = _series_term(pullback, v, k, w)
        survive = ops.power(ops.cast(1 - p, v.dtype), ops.cast(ops.maximum(k - terms, 0), v.dtype))
        return k + 1, w, total + t / survive

    start = (ops.convert_to_tensor(1, "int32"), v, ops.zeros(ops.shape(v)[:1], dtype=v.dtype))
    return backend.bounded_while(lambda k, w, total: k <= n, body, start, terms + max_extra)[2]


class ResidualFlow(FlowLayer):
    """y = x + g(x), invertible when Lip(g) < 1 (i-ResNet, Behrmann et al. 2019, eq. 1–2); g is a
    Keras model whose linear maps are spectrally normalised (SpectralDense / SpectralConv2D) and
    whose activations are 1-Lipschitz.

    `reverse` is the Banach fixed-point iteration x_{k+1} = y − g(x_k) from x_0 = y (i-ResNet
    Algorithm 1), until every coordinate's change |Δx| / (1 + |x|) falls below `tol` (absolute near 0,
    relative for large values, which float32 cannot resolve to 1e-6 absolutely) or after `max_iter`.

    The log-det is the power series log det(I + J_g) = Σ_{k≥1} (−1)^{k+1} tr(J_g^k) / k (i-ResNet eq. 6),
    each trace by Hutchinson's vᵀ J^k v, v ~ N(0, I), through k vector-Jacobian products
    (`flowkit.backend.vjp`): "truncated", the first `terms` terms (i-ResNet; biased); "roulette",
    Residual Flows' Russian roulette (unbiased); "exact", log|det(I + J_g)| of the brute-force Jacobian
    (small dimensions; tests, 2-D toys). The forward call adds −(estimate), batch mean, with add_loss;
    the estimate is differentiated through (the training tape records the products).
    """

    ESTIMATORS = ("truncated", "roulette", "exact")
    MAX_EXTRA = 40

    def __init__(self, g, logdet="truncated", terms=5, p=0.5, tol=1e-6, max_iter=100, seed=None, **kwargs):
        super().__init__(**kwargs)
        if logdet not in self.ESTIMATORS:
            raise ValueError(f"logdet must be one of {self.ESTIMATORS}, not {logdet!r}")
        self.g, self.logdet, self.terms, self.p = g, logdet, int(terms), float(p)
        self.tol, self.max_iter, self.seed = float(tol), int(max_iter), seed
        self.noise = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        if not self.g.built:
            self.g.build(input_shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def encode(self, x, training=None):
        if _inferring_shapes():
            # building a functional model: only y's shape counts (x's), the values and the added loss are
            # thrown away; g's variables exist (build), and the power series' graph took seconds per block
            return x, 0
        with _held_kernels(self.g):
            gx, pullback = backend.vjp(lambda x: ops.cast(self.g(x, training=training), x.dtype), x)
            return x + gx, self.log_det(pullback, x)

    def log_det(self, pullback, x, logdet=None, terms=None):
        """Per-example estimate of log det(I + J_g(x)) by `logdet` (default: the layer's), where
        `pullback` (flowkit.backend.vjp of g at x) maps w to wᵀ J_g."""
        logdet, terms = logdet or self.logdet, terms or self.terms
        if logdet == "exact":
            d = math.prod(x.shape[1:])
            return ops.slogdet(pullback.jacobian() + ops.eye(d, dtype=x.dtype))[1]
        v = keras.random.normal(ops.shape(x), dtype=x.dtype, seed=self.noise)
        if logdet == "truncated":
            return _truncated_series(pullback, v, terms)
        u = 1 - keras.random.uniform((), dtype=x.dtype, seed=self.noise)  # in (0, 1]: log u is finite
        return _roulette_series(pullback, v, terms, self.p, u, self.MAX_EXTRA)

    def fixed_point(self, y, tol=None, max_iter=None):
        """(iterations, x, last change): Banach's iteration x_{k+1} = y − g(x_k), x_0 = y."""
        tol = self.tol if tol is None else tol
        max_iter = self.max_iter if max_iter is None else max_iter

        def body(i, x, change):
            x_new = y - ops.cast(self.g(x, training=False), y.dtype)
            return i + 1, x_new, ops.max(ops.abs(x_new - x) / (1 + ops.abs(x_new)))

        start = (ops.convert_to_tensor(0, "int32"), y, ops.convert_to_tensor(np.inf, y.dtype))
        with _held_kernels(self.g):
            return ops.while_loop(lambda i, x, change: ops.logical_and(i < max_iter, change > tol), body, start)

    def reverse(self, y):
        if _inferring_shapes():  # a decoder's build: x has y's shape, no need for the loop's graph
            return y
        return self.fixed_point(y)[1]

    def get_config(self):
        return {**super().get_config(), "g": keras.saving.serialize_keras_object(self.g),
                "logdet": self.logdet, "terms": self.terms, "p": self.p, "tol": self.tol,
                "max_iter": self.max_iter, "seed": self.seed}

    @classmethod
    def from_config(cls, config):
        config["g"] = keras.saving.deserialize_keras_object(config["g"])
        return cls(**config)


@contextlib.contextmanager
def log_det_estimator(model, logdet, terms):
    """Within the `with`, every ResidualFlow in `model` (a flow, a model or a block) estimates its
    log-det by `logdet` with `terms` terms instead of its own, e.g. an evaluation-grade estimate through
    `flow(x, return_log_det=True)`; a tf.function traced inside keeps that estimator."""
    if logdet not in ResidualFlow.ESTIMATORS:
        raise ValueError(f"logdet must be one of {ResidualFlow.ESTIMATORS}, not {logdet!r}")
    blocks = [l for l in [model, *flow_layers_of(model)] if isinstance(l, ResidualFlow)]
    saved = [(b.logdet, b.terms) for b in blocks]
    for b in blocks:
        b.logdet, b.terms = logdet, int(terms)
    try:
        yield blocks
    finally:
        for b, (kind, n) in zip(blocks, saved):
            b.logdet, b.terms = kind, n


# --- TarFlow (Zhai et al. 2024, "Normalizing Flows are Capable Generative Models"; the series'
# "TarFlow: 流模型满血归来?"): patches as tokens, causal-Transformer affine autoregressive blocks ---

class Patchify(FlowLayer):
    """(h, w, c) -> (T, p²c), T = hw/p²: the image cut into non-overlapping p×p patches, row by row, each patch
    flattened (TarFlow's tokens; MNIST with p = 4: 49 tokens of 16). Log-det 0; the inverse puts
    the patches back."""

    def __init__(self, patch=4, **kwargs):
        super().__init__(**kwargs)
        self.patch = int(patch)

    def build(self, input_shape):
        h, w, c = input_shape[1:]
        if h % self.patch or w % self.patch:
            raise ValueError(f"patch {self.patch} does not divide the image size {h}×{w}")
        self.grid = (h // self.patch, w // self.patch, c)

    def encode(self, x, training=None):
        (gh, gw, c), p = self.grid, self.patch
        x = ops.reshape(x, (-1, gh, p, gw, p, c))
        x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
        return ops.reshape(x, (-1, gh * gw, p * p * c)), 0

    def reverse(self, z):
        (gh, gw, c), p = self.grid, self.patch
        z = ops.reshape(z, (-1, gh, gw, p, p, c))
        z = ops.transpose(z, (0, 1, 3, 2, 4, 5))
        return ops.reshape(z, (-1, gh * p, gw * p, c))

    def get_config(self):
        return {**super().get_config(), "patch": self.patch}


class Flip(FlowLayer):
    """z_t = x_{T−1−t}, the token order reversed (axis 1): TarFlow's permutation, so that consecutive
    blocks are autoregressive in opposite directions. Log-det 0; its own inverse."""

    def encode(self, x, training=None):
        return ops.flip(x, axis=1), 0

    def reverse(self, z):
        return ops.flip(z, axis=1)


class TarBlock(FlowLayer):
    """One TarFlow block on tokens x (T, D): z_t = (x_t − μ_t) ⊗ exp(−a_t), (a_t, μ_t) = f(x_<t)
    (Zhai et al. 2024, the TarFlow block), log-det −Σ_t Σ a_t. f is the `network` passed in (tarflow.py's
    CausalTransformer, as a coupling takes its networks): its outputs are shifted right by one token,
    with zeros for the first, so token t's parameters see only x_<t.

    `reverse` is the sequential inverse x_t = z_t ⊗ exp(a_t) + μ_t, token by token (T − 1 passes,
    one `ops.fori_loop`, so a compiled decoder traces one pass, not T). With `use_cache` (default)
    each pass runs only the newest token through f (`network.step`), against its layers' keys and
    values kept in fixed-size buffers (a key-value cache); without it each pass runs f over the whole
    sequence. Class-conditional when the network has `classes`: inputs [x, y] with integer labels y;
    while training a label is replaced by the "no class" index `classes` with probability
    `label_drop`; `reverse` with `guidance` w ≠ 0 uses (1 + w)·f(x, y) − w·f(x, no class)
    (classifier-free guidance). `guidance` and `use_cache` are arguments of the inverse call
    (`block.inverse()(z, guidance=w, use_cache=False)`, or a Flow's inverse, which hands them on), plain
    Python values read when `reverse` runs: a compiled decoder reads them when it traces, so it keeps one
    compiled decoder per setting (tarflow.decode).
    """

    def __init__(self, network, label_drop=0.1, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.network = network
        self.label_drop, self.seed = float(label_drop), seed
        self.label_seed = keras.random.SeedGenerator(seed)

    @property
    def classes(self):
        return self.network.classes

    def build(self, input_shape):
        x_shape = input_shape[0] if self.classes else input_shape
        self.tokens = x_shape[1]
        if not self.network.built:
            self.network.build(tuple(x_shape))

    def _unpack(self, inputs):
        if self.classes:
            x, y = inputs
            return x, ops.cast(y, "int32")
        return inputs, None

    def params(self, x, y=None):
        """(a, μ) of every token of x (B, T, D): f over the whole sequence, shifted right by one."""
        f = self.network(x) if y is None else self.network(x, y)
        kept = ops.split(f, [f.shape[1] - 1], axis=1)[0]  # f[:, :-1], whose gradient is a concat, not a scatter
        return ops.split(ops.concatenate([ops.zeros_like(kept[:, :1]), kept], axis=1), 2, axis=-1)

    def encode(self, inputs, training=None):
        x, y = self._unpack(inputs)
        if self.classes and training and self.label_drop > 0:
            drop = keras.random.uniform(ops.shape(y), seed=self.label_seed) < self.label_drop
            y = ops.where(drop, self.classes, y)
        a, mu = self.params(x, y)
        return (x - mu) * ops.exp(-a), -_per_image_sum(a)

    def _guided(self, y, guidance):
        """Labels for one pass of f: y, or [y, no class] stacked on the batch when guidance is on."""
        if not self.classes or not guidance:
            return y
        return ops.concatenate([y, ops.full_like(y, self.classes)], axis=0)

    def _mix(self, p, guidance):
        """Classifier-free guidance on per-token parameters of a doubled batch: (1 + w)·cond − w·uncond."""
        if not self.classes or not guidance:
            return p
        cond, uncond = ops.split(p, 2, axis=0)
        return cond + guidance * (cond - uncond)

    def reverse(self, inputs, guidance=0.0, use_cache=True):
        """x from z (conditional: from [z, y]) token by token, at classifier-free guidance weight
        `guidance` (a number; 0: none), with or without the key-value cache (`use_cache`)."""
        z, y = self._unpack(inputs)
        y = self._guided(y, guidance)
        guided = y is not None and bool(guidance)
        double = (lambda t: ops.concatenate([t, t], axis=0)) if guided else (lambda t: t)

        def put(x, t, x_t):  # x with token t set (it was zero): no slicing, so any backend compiles it
            return x + ops.one_hot(t, self.tokens, dtype=x.dtype)[None, :, None] * x_t[:, None]

        def step(t, state):  # x_t = z_t·exp(a_t) + μ_t, (a_t, μ_t) from x_<t
            x, cache = state
            if not cache:  # f over the whole sequence; the tokens not known yet are zero
                a, mu = (ops.take(p, t, axis=1) for p in self.params(double(x), y))
            else:  # only the newest token x_{t−1} goes through f, against the cached keys and values
                out, cache = self.network.step(double(ops.take(x, t - 1, axis=1)[:, None]), y, t - 1, cache)
                a, mu = ops.split(out, 2, axis=-1)
            return put(x, t, ops.take(z, t, axis=1) * ops.exp(self._mix(a, guidance)) + self._mix(mu, guidance)), cache

        x = put(ops.zeros_like(z), 0, z[:, 0])  # token 0 has a = μ = 0
        cache = self.network.empty_cache(ops.shape(z)[0] * (2 if guided else 1)) if use_cache else []
        return ops.fori_loop(1, self.tokens, step, (x, cache))[0]

    def get_config(self):
        return {**super().get_config(), "network": keras.saving.serialize_keras_object(self.network),
                "label_drop": self.label_drop, "seed": self.seed}

    @classmethod
    def from_config(cls, config):
        config["network"] = keras.saving.deserialize_keras_object(config["network"])
        return cls(**config)
