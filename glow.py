"""Glow (with RealNVP's pieces) on an image folder or MNIST — "RealNVP 与 Glow · 流模型的传承与升华".

The article's Keras script in Keras 3: images x/255·2 − 1 (+ U(0,1)/256 inside the model while
training) go through `level` levels of  squeeze → depth × [Actnorm → permute → split → coupling →
concat]; at the end of every level but the last half of the channels leave as z_i through the
conditional prior CondActnorm (eq. 03–05); the last level ends in a learned Actnorm; the z's are
flattened and concatenated. Loss 0.5·Σz² + 0.5·D·log 2π (compiled) plus every layer's −log|det|
(add_loss): −log q(x) in nats per image. The flow is one `Flow` of those layers (the exits are
`MultiScale` layers); the decoder is `flow.inverse()`: the same layers backwards, each one's
`.inverse()`. Read top to bottom: data, model, training, sampling, the article's
experiments, the command line.

    python glow.py                       # MNIST zero-padded to 32×32 (the article's net: slow on CPU)
    python glow.py --data ~/celeba/img_align_celeba
    python glow.py --data ~/photos --img-size 32 --level 3 --depth 8 --hidden 64 --coupling affine  # a CPU run
    python glow.py --sample-only --weights glow.weights.h5   # the architecture is recorded in the file
"""
import os
import sys

from flowkit import cli
import keras
import numpy as np

from flow_layers import (Actnorm, AffineCouple, CheckerConcat, CheckerSplit, Concat, Flow, InvDense, MultiScale,
                         Permute, Reshape, Split, Squeeze, UniformNoise, initialize_actnorms)
from flowkit import score as sample_score
from flowkit.cli import non_negative, positive
from flowkit.curves import kept
from flowkit.data import eval_batch, image_source, load_folder, mnist_pixels
from flowkit.density import BitsPerDim, bits_per_dim, dequantized, prior_nll
from flowkit.files import UserError, write_png
from flowkit.pipeline import batches, first
from flowkit.optim import Adam
from flowkit.run import Run
from flowkit.sample import (EpochGrid, decode_codes, image_grid, interpolation_codes, parse_temperatures, row_grid,
                            sample, temperature_codes)

BIN = 2 / 256          # bin width of one pixel level once images are mapped to [−1, 1]
GRID = 9               # the article's 9×9 sample grid
BF16_DEFAULT = True  # on a CPU with bfloat16 instructions; measured by tools/bench.py (docs/running.md)
RECONSTRUCT = 8        # held-out images shown by --reconstruct
CACHE = "image_cache"  # beside --weights: a folder's decoded images when they exceed flowkit.data.CACHE_MEMORY
# the article's collapse rule, in its `Evaluate` callback: "在后面，loss一般为负数，一旦重新变成正数，就意味着模型已经崩溃，
# 需要降低学习率" — a training loss above 0 after epoch 10 reloads the best weights, learning rate 1e-5
COLLAPSE_AFTER_EPOCH = 10
COLLAPSE_LR = 1e-5


# --- data ---------------------------------------------------------------------------------------

def train_x(k, r):
    """The article's training input k/255·2 − 1 (the model adds U(0,1)/256 while training): a
    flowkit.pipeline transform."""
    return r.cast(k, "float32") / 255 * 2 - 1


def datasets(args, training=True):
    """(train, test, channels): pipelines (flowkit.pipeline) of (x, dummy y); train repeats forever (None
    when not `training`), the test images are dequantized over the whole bin with fresh noise each pass
    (docs/design.md §3). A folder's images are decoded once, before training (flowkit.data.image_source)."""
    train = None
    if args.data and os.path.isdir(args.data):
        train_paths, test_paths = load_folder(args.data, args.config.get("split_seed", args.seed))
        cli.check_batch_size(args, len(train_paths))
        if args.config.get("held_out", len(test_paths)) != len(test_paths):
            print(f"warning: {args.data} now holds out {len(test_paths)} images, {args.config['held_out']} at "
                  f"training: the folder changed, some images may be training ones", file=sys.stderr)
        args.config["held_out"] = len(test_paths)
        cache = os.path.join(os.path.dirname(os.path.abspath(args.weights)), CACHE)
        test, where = image_source(test_paths, args.img_size, cache)
        if training:
            train, where = image_source(train_paths, args.img_size, cache)
        print(f"{len(train_paths)} training images, {len(test_paths)} held out, from {args.data}; "
              f"{'training' if training else 'held-out'} images {where}", flush=True)
        channels = 3
    else:
        train, test = mnist_pixels(args.data)
        cli.check_batch_size(args, len(train))
        channels = 1
    if training:
        train = batches(train, args.batch_size, train_x, shuffle=True, seed=args.seed, repeat=True)
    test = dequantized(test, eval_batch(args.batch_size), -1, BIN)
    return train if training else None, test, channels


# --- the model ----------------------------------------------------------------------------------

def coupling_net(channels, hidden, name, log_scale=False, checker=None, joint=False):
    """The article's coupling network f (its `build_basic_model`): Conv3×3(hidden)–ReLU–Conv1×1(hidden)–
    ReLU–Conv3×3, the last layer zero-initialised so the step starts as the identity. As a log-scale
    net it ends in tanh: |log s| ≤ 1 per step, so one step cannot blow a scale up. `joint`: Glow's f
    for an affine coupling, one network for both log s and t (the article's Fig. 11): its last layer
    2·channels wide, read as [tanh(log s), t], half the convolutions of a log-scale and a shift network.

    With `checker` (the step's CheckerSplit) it is RealNVP's masked convolution: x1's squares go back
    on the full grid with zeros on x2's (b ⊙ x), and the output is read on x2's squares."""
    x_in = keras.Input((None, None, channels))
    h = x_in if checker is None else checker.inverse()([x_in, keras.ops.zeros_like(x_in)])
    h = keras.layers.Conv2D(hidden, 3, padding="same", activation="relu")(h)
    h = keras.layers.Conv2D(hidden, 1, padding="same", activation="relu")(h)
    h = keras.layers.Conv2D(2 * channels if joint else channels, 3, padding="same", kernel_initializer="zeros")(h)
    if checker is not None:
        h = checker(h)[1]
    if joint:
        h = keras.layers.Concatenate()([keras.layers.Activation("tanh")(h[..., :channels]), h[..., channels:]])
    elif log_scale:
        h = keras.layers.Activation("tanh")(h)
    return keras.Model(x_in, h, name=name)


def glow_step(channels, hidden, name, permute="random", coupling="additive", checker=None, affine_net="joint"):
    """One step of the flow on `channels` channels (the article's loop body, 源码分析): Actnorm -> mix
    the channels (InvDense for permute="conv", else a Permute) -> split -> coupling -> concat.
    `checker` None splits the channels in halves (Glow); 0 or 1 is RealNVP's checkerboard mask of
    that parity. `coupling` "affine" adds RealNVP's log scale: from the shift's own network
    (`affine_net` "joint", Glow's f) or from a second network ("separate")."""
    mix = InvDense(name=f"invdense_{name}") if permute == "conv" else Permute(permute, name=f"permute_{name}")
    if checker is None:
        half, mask = channels // 2, None
        split, concat = Split(name=f"split_{name}"), Concat(name=f"concat_{name}")
    else:
        half, mask = channels, CheckerSplit(parity=checker, name=f"checker_{name}")
        split, concat = mask, CheckerConcat(parity=checker, name=f"checker_concat_{name}")
    if coupling == "affine" and affine_net == "joint":
        couple = AffineCouple(coupling_net(half, hidden, f"f_{name}", checker=mask, joint=True), joint=True,
                              name=f"couple_{name}")
    else:
        log_s = coupling_net(half, hidden, f"log_scale_{name}", True, mask) if coupling == "affine" else None
        couple = AffineCouple(coupling_net(half, hidden, f"shift_{name}", checker=mask), log_s, name=f"couple_{name}")
    return Flow([Actnorm(name=f"actnorm_{name}"), mix, split, couple, concat], name=f"step_{name}")


def glow_flow(channels, level=3, depth=10, hidden=512, permute="random", coupling="additive", mask="channel",
              affine_net="joint"):
    """The article's multi-scale flow on images of `channels` channels, built from the inside out: each
    level is squeeze -> `depth` × glow_step; every level but the last ends in a MultiScale exit (half
    the channels leave through the conditional prior, the rest go on to the next level); the last
    level ends in a learned Actnorm, flattened (the article's `final_actnorm`). f-VAE's prior is one
    too (fvae.py). `mask`: how each coupling splits — "channel" (halves of the channels, Glow's),
    "checkerboard" (RealNVP's spatial mask, parity alternating from step to step) or "alternate"
    (checkerboard and channel steps in turn, as RealNVP alternates them)."""
    def checker(j):  # None: channel halves; 0 or 1: the checkerboard's parity
        if mask == "checkerboard":
            return j % 2
        return (j // 2) % 2 if mask == "alternate" and j % 2 == 0 else None

    inner = None
    for i in reversed(range(level)):  # the last level first: it is the innermost
        c = channels * 2 ** (i + 2)  # 4× per squeeze, halved by every exit before this level
        steps = [Squeeze(name=f"squeeze_{i}")]
        steps += [glow_step(c, hidden, f"{i}_{j}", permute, coupling, checker(j), affine_net) for j in range(depth)]
        if inner is None:
            steps += [Actnorm(name="final_actnorm"), Reshape(name="final_reshape")]
        else:
            steps.append(MultiScale(inner, name=f"exit_{i}"))
        inner = Flow(steps, name=f"level_{i}")
    return inner


def build_glow(img_size, channels, level=3, depth=10, hidden=512, permute="random", coupling="additive",
               mask="channel", affine_net="joint"):
    """(encoder, decoder): the encoder x -> z (the article's noise, then the flow) and the decoder
    z -> x, the same layers inverted in reverse order (`flow.inverse()`). The flow is
    glow_flow: `level` × [squeeze, `depth` × (Actnorm, permute, split, coupling, concat)], every
    level but the last ending in a multi-scale exit."""
    check_size(img_size, level, mask)
    flow = glow_flow(channels, level, depth, hidden, permute, coupling, mask, affine_net)
    x_in = keras.Input((img_size, img_size, channels))
    encoder = keras.Model(x_in, flow(UniformNoise(1 / 256, name="noise")(x_in)), name="encoder")
    z_in = keras.Input(encoder.output.shape[1:])
    return encoder, keras.Model(z_in, flow.inverse()(z_in), name="decoder")


def check_size(img_size, level, mask="channel"):
    if img_size < 2 ** level or img_size % 2 ** level:
        raise UserError(f"--img-size {img_size} must be a multiple of 2^level = {2 ** level} "
                        f"(each of the {level} levels halves it)")
    if mask != "channel" and (img_size // 2 ** level) % 2:
        raise UserError(f"--img-size {img_size} with --mask {mask}: the checkerboard pairs squares, so the "
                        f"last level's side {img_size // 2 ** level} must be even (a multiple of {2 ** (level + 1)})")


# --- training -----------------------------------------------------------------------------------

def compile_glow(encoder, lr=1e-4):
    """The article's Adam(1e-4) on the prior term (the layers add −log|det|)."""
    encoder.compile(optimizer=Adam(lr), loss=prior_nll)


def train(args, strategy):
    """The article's training: the best weights by training loss, its collapse rule after epoch 10,
    a 9×9 grid after every epoch; the Actnorms initialised from the first batch."""
    cli.check_training(args)  # before the data are read (CelebA: minutes)
    train_data, test, channels = datasets(args)
    with strategy.scope():  # variables mirrored on every replica, the optimizer's too
        encoder, decoder = build_glow(**shape(args.config))
        compile_glow(encoder, args.lr)
    dims = args.img_size ** 2 * channels
    print(f"Glow: {cli.describe(args.config)}, {encoder.count_params():,} parameters, D = {dims}")
    # the article's `Evaluate`: the best weights by training loss and its collapse rule, applied by flowkit.run's
    # KeepBest (which also takes a NaN loss for a collapse, at any epoch); a held-out loss (--monitor val_loss)
    # has no sign to watch: only a NaN is a collapse then. A resumed run keeps the rule it started with
    collapse_after = COLLAPSE_AFTER_EPOCH if args.monitor == "loss" else None
    run = Run(encoder, cli.run_settings(args), strategy, monitor=args.monitor, collapse_after=collapse_after,
              low_lr=COLLAPSE_LR)
    with strategy.scope():  # one eager pass over the global batch: every replica gets its statistics
        # after a --resume the Actnorms' `initialized` flag came back: none is initialised again
        print(f"initialised {initialize_actnorms(encoder, next(iter(train_data))[0])} Actnorm layers "
              f"from the first batch")
    encoder.fit(train_data, validation_data=test, epochs=args.epochs, initial_epoch=run.initial_epoch,
                steps_per_epoch=args.steps_per_epoch,
                callbacks=[BitsPerDim(dims, BIN, key="val_loss"),
                           *run.chief_only(EpochGrid(lambda: sample_grid(decoder, args.std, args.seed),
                                                     os.path.join(args.out, "glow_epoch_{epoch:03d}.png"))),
                           *run.callbacks],
                shuffle=False, verbose=run.verbose)  # the dataset shuffles itself
    code = run.end(pictures=lambda: sample_score.report(write_grid(decoder, args), data=args.data))
    if code:
        return code
    nll = encoder.evaluate(test, verbose=0, return_dict=True)["loss"]
    print(kept(run.log, run.keep_best.best_epoch, args.monitor))
    print(f"best weights in {args.weights}, samples in {os.path.join(args.out, 'glow_samples.png')}")
    print(f"test bits/dim: {bits_per_dim(nll, dims, BIN):.3f}")
    return 0


def shape(config):
    """The model's shape: the record less what it keeps of the data (flowkit.cli.FOLDER_RECORD)."""
    return {k: v for k, v in config.items() if k not in cli.FOLDER_RECORD}


# --- sampling -----------------------------------------------------------------------------------

def sample_grid(decoder, std, seed=0, n=GRID):
    """n×n samples at temperature `std` as a uint8 picture (the article's `sample`)."""
    return image_grid(sample(decoder, n * n, std, seed), n, low=-1, high=1)


def write_grid(decoder, args):
    return write_png(os.path.join(args.out, "glow_samples.png"), sample_grid(decoder, args.std, args.seed))


# --- the article's experiments ------------------------------------------------------------------

def reconstruct(encoder, decoder, test, n=RECONSTRUCT):
    """n held-out images (top row) over decoder(encoder(x)) (bottom row) as one picture, and the
    largest absolute error: every split z is kept in the z vector, so the round trip is exact."""
    x = first(test, n)
    x_rec = keras.ops.convert_to_numpy(decoder(encoder(x, training=False), training=False))
    pic = np.concatenate([np.concatenate(list(row), axis=1) for row in (x, x_rec)], axis=0)
    return image_grid(pic[None], 1, low=-1, high=1), float(np.max(np.abs(x - x_rec)))


def temperature_rows(decoder, temperatures, seed=0, n=GRID):
    """(temperatures, n, h, w, c) in [−1, 1]: decoder(T·ε_j) with the same ε_j in every row, so a column
    is one z direction at rising temperature; T = 0 gives decoder(0), the mode of the prior."""
    return decode_codes(decoder, temperature_codes(temperatures, n, decoder.input.shape[-1], seed))


def interpolation_rows(encoder, decoder, test, pairs, steps=GRID):
    """(images, rows): 2·pairs held-out images and, per pair, the straight line between their codes
    (row 2i) over the great circle (row 2i + 1), `steps` decoded codes each. The code is every level's
    z concatenated (the encoder's output), so the end columns decode back to the images themselves."""
    x = first(test, 2 * pairs)
    if len(x) < 2 * pairs:
        raise UserError(f"--interpolate {pairs}: needs {2 * pairs} held-out images, there are {len(x)}")
    z = keras.ops.convert_to_numpy(encoder(x, training=False))
    return x, decode_codes(decoder, np.concatenate([interpolation_codes(z[i], z[i + 1], steps)
                                              for i in range(0, len(z), 2)]))


def experiments(args):
    """--sample-only / --score / --reconstruct / --temperatures / --interpolate: load --weights, write PNGs."""
    test = None
    if args.reconstruct or args.interpolate:
        _, test, _ = datasets(args, training=False)
    encoder, decoder = build_glow(**shape(args.config))
    cli.load_weights(encoder, args)
    if args.sample_only:
        write_grid(decoder, args)
    if args.score:
        sample_score.score_samples("glow", lambda z, _: (decode_codes(decoder, z) + 1) / 2, decoder.input.shape[-1],
                                   args.std, n=args.score, seed=args.seed, out=args.out, data=args.data)
    if args.reconstruct:
        pic, err = reconstruct(encoder, decoder, test)
        path = os.path.join(args.out, "glow_reconstruct.png")
        write_png(path, pic, f"held-out images over their reconstructions; max abs error {err:.2e}")
    pictures = {}
    if args.temperatures:
        pictures["glow_temperatures.png"] = temperature_rows(decoder, args.temperatures, args.seed)
    if args.interpolate:
        pictures["glow_interpolate.png"] = interpolation_rows(encoder, decoder, test, args.interpolate)[1]
    for name, rows in pictures.items():
        write_png(os.path.join(args.out, name), row_grid(rows, low=-1, high=1))
    return 0


# --- command line -------------------------------------------------------------------------------

def parse_args(argv=None):
    p = cli.ArgumentParser(description="Glow (RealNVP/Glow article) on an image folder or MNIST.")
    cli.shape_arg(p, "--img-size", None, type=positive(int),
                  help="image side after centre crop and resize (64 for a folder; MNIST is 32)")
    cli.shape_arg(p, "--level", 3, type=positive(int), help="levels L of the multi-scale architecture")
    cli.shape_arg(p, "--depth", 10, type=positive(int), help="flow steps K per level")
    cli.shape_arg(p, "--hidden", 512, type=positive(int), help="channels of the coupling networks")
    cli.shape_arg(p, "--permute", "random", choices=("reverse", "random", "conv"),
                  help="channel mixing per step: reversal, the article's random shuffle, or Glow's 1×1 conv")
    cli.shape_arg(p, "--coupling", "additive", choices=("additive", "affine"),
                  help="additive (the article's) or affine coupling (log s through tanh)")
    cli.shape_arg(p, "--affine-net", "joint", choices=("joint", "separate"), absent="separate",
                  help="an affine coupling's networks: one f gives log s and t (Glow's, the article's Fig. 11) or "
                       "a log-scale network beside the shift's (weights trained before 2026-12-06)")
    cli.shape_arg(p, "--mask", "channel", choices=("channel", "checkerboard", "alternate"),
                  help="how each coupling splits its input: halves of the channels (Glow's), RealNVP's spatial "
                       "checkerboard, or the two in turn (RealNVP's alternation)")
    p.add_argument("--data", help="folder of images, searched recursively (png, jpg/jpeg, bmp, gif, webp), "
                                  "e.g. CelebA's img_align_celeba; or an mnist.npz file. "
                                  "Default: MNIST zero-padded to 32×32")
    p.add_argument("--steps-per-epoch", type=positive(int), default=1000)
    p.add_argument("--std", type=non_negative, default=0.9, help="standard deviation (temperature) of sampled z")
    p.add_argument("--reconstruct", action="store_true",
                   help="no training: encode held-out images and decode them back; "
                        "originals over reconstructions in OUT/glow_reconstruct.png")
    p.add_argument("--temperatures", metavar="T1,T2,...",
                   help="no training: write OUT/glow_temperatures.png, one row of 9 samples per standard "
                        "deviation of z (0 is decoder(0), the mode), the same z direction per column")
    p.add_argument("--interpolate", type=positive(int), default=0, metavar="N",
                   help="no training: encode N pairs of held-out images, write OUT/glow_interpolate.png: "
                        "per pair the straight line between the codes over the great circle")
    p.add_argument("--monitor", choices=("loss", "val_loss"), default="loss",
                   help="keep the weights of the epoch with the lowest training loss (the article's rule, with its "
                        "collapse reload) or the lowest held-out loss (a small folder overfits) (default: loss)")
    cli.add_run_args(p, weights="glow.weights.h5", epochs=100, batch_size=64, lr=1e-4, seed=0,
                     bf16_default=BF16_DEFAULT)
    args = cli.parse(p, argv, model="glow", uses_weights=("reconstruct", "temperatures", "interpolate"),
                     images=(32, 64), reads_data=("reconstruct", "interpolate"), records_folder=True)
    if args.temperatures is not None:
        args.temperatures = parse_temperatures(args.temperatures)
    check_size(args.img_size, args.level, args.mask)
    return args


def main(argv=None):
    return cli.run_script(parse_args, train, experiments, argv)


if __name__ == "__main__":
    sys.exit(main())
