"""f-VAEs — "f-VAEs：Glow 与 VAEs 的联姻" (Su & Wu 2018, arXiv 1809.05861): a VAE whose latent goes
through a Glow flow, on MNIST or an image folder.

The model. An encoder E (squeezes, each followed by residual blocks) maps an image x to a spatial latent
E(x); the posterior sample is z = E(x) + σ ⊙ u, u ~ N(0, I), with σ a learned scale per latent dimension;
a decoder G mirroring E (residual blocks, inverse squeezes, tanh) gives the mean of a Gaussian
p(x|z) = N(x; G(z), diag σ_x²) with a learned scale σ_x per pixel; the prior of z is a Glow flow F
(glow.glow_flow): p(z) = N(F(z); 0, I)·|det ∂F/∂z|. Sampling: ε ~ N(0, T²I), z = F⁻¹(ε), x = G(z).

The loss, from the ELBO  −log p(x) ≤ E_q(z|x)[ −log p(x|z) − log p(z) + log q(z|x) ], one u per image:
    −log p(x|z) = 0.5·‖r‖² + 0.5·D·log 2π + Σ log σ_x,          r = (x − G(z)) / σ_x
    −log p(z)   = 0.5·‖ε‖² + 0.5·d·log 2π − log|det ∂F/∂z|,     ε = F(z)
    +log q(z|x) = −0.5·‖u‖² − 0.5·d·log 2π − Σ log σ              (log N(u) − log|det ∂z/∂u|, z = E(x) + σ⊙u)
(D pixels, d latent dimensions.) (x, z) -> (r, ε) is a flow with a triangular Jacobian, so the first
two lines are −log N([ε, r]; 0, I) − log|det|: the model's output is [ε, r] with the compiled loss
flowkit.density.prior_nll (docs/design.md §2), and the layers add the rest as batch means (add_loss): F's
−log|det ∂F/∂z|, a Scale on r (log-scale −log σ_x) Σ log σ_x, a Scale on u (log-scale log σ) −Σ log σ,
and flowkit.density.NormalNLL(sign=−1) −0.5‖u‖² − 0.5·d·log 2π. So `fit` minimises this Monte-Carlo −ELBO
in nats per image; the test figure is the ELBO bound in bits/dim on (k + u)-dequantized images
(docs/design.md §3), an upper bound on the NLL. The `elbo` model is the same sum per image (the same
layers with return_log_det=True); `--iw K` adds from it the importance-weighted bound
−log (1/K)·Σ_k p(x, z_k)/q(z_k|x) (Burda et al. 2015), tighter.

    python fvae.py --limit 2000 --epochs 2          # a quick try on MNIST (~2.5 min on 2 busy CPU cores)
    python fvae.py --data ~/celeba/img_align_celeba --img-size 64
    python fvae.py --sample-only --reconstruct --interpolate 2 --iw 64   # on fvae.weights.h5
"""
import math
import os
import sys
from types import SimpleNamespace

from flowkit import cli
import keras
import numpy as np
from keras import layers

import glow  # F is Glow's flow: the article marries the two (the one script another script imports)
from flow_layers import Concat, Reshape, Scale, Squeeze, initialize_actnorms
from flowkit import score as sample_score
from flowkit.cli import non_negative, positive
from flowkit.data import decode_images, eval_batch, folder_source, load_folder, mnist_pixels
from flowkit.density import BitsPerDim, NormalNLL, bits_per_dim, dequantize, prior_nll
from flowkit.files import UserError, write_png
from flowkit.pipeline import batches, first
from flowkit.optim import Adam
from flowkit.run import Run
from flowkit.sample import EpochGrid, decode_codes, image_grid, interpolation_codes, row_grid, sample

BIN = 2 / 256          # bin width of one pixel level once images are mapped to [−1, 1]
GRID = 9               # 9×9 sample grids
TEMPERATURES = (1.0, 0.8)  # the original script shows samples at both
RECONSTRUCT = 8        # held-out images shown by --reconstruct
INIT_STD = 0.1         # σ and σ_x at the start


# --- data ---------------------------------------------------------------------------------------

def pixels(args):
    """(train, test, channels, n): the integer pixels k (h, w, c) of MNIST padded to 32×32 or of an image
    folder (glow's loaders in flowkit.data): train a flowkit.pipeline source (a folder's images decoded
    as they are read on tf.data), test a uint8 array decoded once; --limit keeps the first N of each."""
    if args.data and os.path.isdir(args.data):
        train_paths, test_paths = load_folder(args.data, args.seed)
        if args.limit:
            train_paths, test_paths = train_paths[:args.limit], test_paths[:args.limit]
        train, test = folder_source(train_paths, args.img_size), decode_images(test_paths, args.img_size)
        print(f"{len(train_paths)} training images, {len(test_paths)} held out, from {args.data}")
        return train, test, 3, len(train_paths)
    k_train, k_test = mnist_pixels(args.data)
    if args.limit:
        k_train, k_test = k_train[:args.limit], k_test[:args.limit]
    return k_train, k_test, 1, len(k_train)


def with_noise(latent_dims):
    """The flowkit.pipeline transform of integer pixels k -> the inputs (x, u): x = −1 + (k + v)·2/256
    with fresh v ~ U(0,1) (the exact bin, docs/design.md §3) and the posterior noise u ~ N(0, I) of the
    model's second input, both new at every pass."""
    def add(k, r):
        k = r.cast(k, "float32")
        x = dequantize(k, -1, BIN, r.uniform(r.shape(k)))
        return x, r.normal([r.shape(k)[0], latent_dims])

    return add


def datasets(args, latent_dims):
    """(train, test, n): ((x, u), dummy) batches, train shuffled and endless, of `pixels`' n training images."""
    train, test, _, n = pixels(args)
    cli.check_batch_size(args, n)
    train = batches(train, args.batch_size, with_noise(latent_dims), shuffle=True, seed=args.seed, repeat=True)
    return train, batches(test, eval_batch(args.batch_size), with_noise(latent_dims)), n


# --- the model ----------------------------------------------------------------------------------

def residual_block(h, width, name):
    """h + Conv1×1(ReLU(BatchNorm(Conv3×3(h)))), the last conv zero-initialised: starts as the identity."""
    y = layers.Conv2D(width, 3, padding="same", name=f"{name}_conv3")(h)
    y = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(y)
    y = layers.ReLU(name=f"{name}_relu")(y)
    y = layers.Conv2D(h.shape[-1], 1, kernel_initializer="zeros", name=f"{name}_conv1")(y)
    return layers.Add(name=f"{name}_add")([h, y])


def build_encoder_net(img_size, channels, squeezes, blocks, width):
    """E: `squeezes` × [Squeeze, `blocks` residual blocks]: (s, s, c) -> (s/2^n, s/2^n, c·4^n), as many
    dimensions as the image (the original: 128×128×3 -> 16×16×192)."""
    x_in = keras.Input((img_size, img_size, channels))
    h = x_in
    for i in range(squeezes):
        h = Squeeze(name=f"enc_squeeze_{i}")(h)
        for j in range(blocks):
            h = residual_block(h, width, f"enc_{i}_{j}")
    return keras.Model(x_in, h, name="encoder_net")


def build_generator(latent_shape, squeezes, blocks, width):
    """G, E's mirror: `squeezes` × [`blocks` residual blocks, Squeeze⁻¹], then tanh: z -> mean of x."""
    z_in = keras.Input(latent_shape)
    h = z_in
    for i in reversed(range(squeezes)):
        for j in range(blocks):
            h = residual_block(h, width, f"dec_{i}_{j}")
        h = Squeeze(name=f"dec_squeeze_{i}").inverse()(h)
    return keras.Model(z_in, layers.Activation("tanh", name="tanh")(h), name="generator")


def build_fvae(img_size, channels, squeezes=2, blocks=2, width=64, level=2, depth=4, hidden=64):
    """The parts, sharing variables: `model` ([x, u] -> [ε, r], trained), `elbo` ([x, u] -> the −ELBO
    sample −log p(x, z)/q(z|x) per image), `flow` (z -> ε), `sampler` (ε -> x: G(F⁻¹(ε))),
    `encoder_net` E, `generator` G; `latent_dims` d and `dims` D."""
    check_size(img_size, squeezes, level)
    encoder_net = build_encoder_net(img_size, channels, squeezes, blocks, width)
    latent_shape = tuple(encoder_net.output.shape[1:])
    d = int(np.prod(latent_shape))
    generator = build_generator(latent_shape, squeezes, blocks, width)
    prior = glow.glow_flow(latent_shape[-1], level, depth, hidden)  # F: Glow's flow on z (additive, random permute)
    sigma, inv_sigma_x = Scale(name="posterior_scale"), Scale(name="pixel_scale")
    to_latent, flat = layers.Reshape(latent_shape), Reshape(name="flat_residual")
    x_in, u_in = keras.Input((img_size, img_size, channels), name="x"), keras.Input((d,), name="u")

    # per image, −log p(x, z)/q(z|x), the flow layers returning their log-dets. Built first: Keras checks
    # a functional graph against each layer's first call, which must return the (outputs, log-det) pair
    noise, log_det_q = sigma(u_in, return_log_det=True)
    z = encoder_net(x_in) + to_latent(noise)
    eps, log_det_f = prior(z, return_log_det=True)
    r, log_det_x = inv_sigma_x(flat(x_in - generator(z)), return_log_det=True)
    neg_elbo = (prior_nll(None, eps) - log_det_f + prior_nll(None, r) - log_det_x    # −log p(x, z)
                - prior_nll(None, u_in) - log_det_q)                                 # +log q(z|x)
    elbo = keras.Model([x_in, u_in], neg_elbo, name="fvae_elbo")

    z_in, eps_in = keras.Input(latent_shape), keras.Input((d,))
    flow = keras.Model(z_in, prior(z_in), name="flow")
    sampler = keras.Model(eps_in, generator(prior.inverse()(eps_in)), name="sampler")
    u = NormalNLL(sign=-1, name="posterior_log_density")(u_in)                  # −0.5‖u‖² − 0.5·d·log 2π
    z = layers.Add(name="z")([encoder_net(x_in), to_latent(sigma(u))])          # σ⊙u adds −Σ log σ
    eps = flow(z)                                                                  # adds −log|det ∂F/∂z|
    r = inv_sigma_x(flat(layers.Subtract(name="residual")([x_in, generator(z)])))  # /σ_x, adds Σ log σ_x
    model = keras.Model([x_in, u_in], Concat(name="joint")([eps, r]), name="fvae")
    # Adam moves each log-scale by about lr per step: from NICE's init (scales ≈ 1) σ and σ_x would
    # need thousands of steps to shrink; start them at INIT_STD instead
    for scale, log_std in ((sigma, math.log(INIT_STD)), (inv_sigma_x, -math.log(INIT_STD))):
        scale.log_scale.assign(np.full(scale.log_scale.shape, log_std, scale.log_scale.dtype))
    return SimpleNamespace(model=model, elbo=elbo, flow=flow, sampler=sampler, encoder_net=encoder_net,
                           generator=generator, latent_dims=d, dims=img_size * img_size * channels)


def check_size(img_size, squeezes, level):
    side = img_size // 2 ** squeezes
    if img_size % 2 ** squeezes or side % 2 ** level or side < 2 ** level:
        raise UserError(f"--img-size {img_size}: the encoder's {squeezes} squeezes and the flow's {level} levels "
                        f"halve it {squeezes + level} times; it must be a multiple of {2 ** (squeezes + level)}")


# --- training -----------------------------------------------------------------------------------

def compile_fvae(fvae, lr=1e-3):
    """Adam on −log N([ε, r]; 0, I); the layers add the other terms of the −ELBO (module docstring)."""
    fvae.model.compile(optimizer=Adam(lr), loss=prior_nll)


def iw_bound(elbo, x, k, seed=0, batch=256):
    """(ELBO bound, IW bound) in nats per image, averaged over the images x, from K posterior samples each
    and the per-image −ELBO model: their mean, and −log (1/K)·Σ_k exp(−loss_k) (never above it)."""
    rng = np.random.RandomState(seed)
    losses = np.zeros((len(x), k))
    for j in range(k):
        u = rng.standard_normal((len(x), elbo.inputs[1].shape[-1])).astype(keras.config.floatx())
        for i in range(0, len(x), batch):  # predict_on_batch: predict() costs a data pipeline per call
            losses[i:i + batch, j] = elbo.predict_on_batch([x[i:i + batch], u[i:i + batch]])
    iw = -(np.logaddexp.reduce(-losses, axis=1) - np.log(k))
    return float(np.mean(losses)), float(np.mean(iw))


def train(args, strategy):
    """Training with the shared run (best weights by test loss, backups, Ctrl-C); samples at T = 1 and
    0.8 after each epoch; the flow's Actnorms initialised from the first batch's z."""
    cli.check_training(args)  # before the data are read
    with strategy.scope():
        fvae = build_fvae(**args.config)
        compile_fvae(fvae, args.lr)
    train_data, test, n = datasets(args, fvae.latent_dims)
    steps = args.steps_per_epoch or max(1, n // args.batch_size)
    print(f"f-VAE: {cli.describe(args.config)}, {fvae.model.count_params():,} parameters, D = {fvae.dims}, "
          f"latent d = {fvae.latent_dims}")
    run = Run(fvae.model, cli.run_settings(args), strategy, monitor="val_loss")  # no collapse rule: Glow's alone
    with strategy.scope():  # after a --resume the Actnorms' `initialized` flag came back: none is redone
        print(f"initialised {initialize_actnorms(fvae.model, next(iter(train_data))[0])} Actnorm layers "
              f"from the first batch", flush=True)
    fvae.model.fit(train_data, validation_data=test, epochs=args.epochs, initial_epoch=run.initial_epoch,
                   steps_per_epoch=steps,
                   callbacks=[BitsPerDim(fvae.dims, BIN, key="loss"), BitsPerDim(fvae.dims, BIN, key="val_loss"),
                              *run.chief_only(*epoch_grids(fvae.sampler, args.out, args.seed)), *run.callbacks],
                   shuffle=False, verbose=run.verbose)  # the dataset shuffles itself
    code = run.end(pictures=lambda: sample_score.report(write_samples(fvae.sampler, args, "fvae_samples")[0],
                                                        data=args.data))
    if code:
        return code
    report(fvae, test, args)
    return 0


def report(fvae, test, args):
    """The last lines: the test ELBO bound (and with --iw K the IW bound) in bits/dim."""
    if args.iw:
        x = first(test, args.iw_images)[0]
        elbo, iw = iw_bound(fvae.elbo, x, args.iw, args.seed)
        print(f"first {len(x)} test images, K = {args.iw}: ELBO bound {bits_per_dim(elbo, fvae.dims, BIN):.3f}, "
              f"IW bound {bits_per_dim(iw, fvae.dims, BIN):.3f} bits/dim")
    nll = fvae.model.evaluate(test, verbose=0, return_dict=True)["loss"]
    print(f"test bits/dim (ELBO bound): {bits_per_dim(nll, fvae.dims, BIN):.3f}")


# --- sampling -----------------------------------------------------------------------------------

def sample_grid(sampler, std, seed=0, n=GRID):
    """n×n samples x = G(F⁻¹(ε)), ε ~ N(0, std²·I), as a uint8 picture."""
    return image_grid(sample(sampler, n * n, std, seed), n, low=-1, high=1)


def write_samples(sampler, args, stem, temperatures=TEMPERATURES):
    """OUT/STEM_T{t}.png for each temperature t; returns their paths."""
    paths = [os.path.join(args.out, f"{stem}_T{t:g}.png") for t in temperatures]
    for t, path in zip(temperatures, paths):
        write_png(path, sample_grid(sampler, t, args.seed))
    return paths


def epoch_grids(sampler, out, seed):
    """The per-epoch pictures (flowkit.sample.EpochGrid callbacks): 9×9 grids at T = 1.0 and 0.8 to
    OUT/fvae_epoch_NNN_T1.png, ..._T0.8.png."""
    return [EpochGrid(lambda t=t: sample_grid(sampler, t, seed),
                      os.path.join(out, f"fvae_epoch_{{epoch:03d}}_T{t:g}.png")) for t in TEMPERATURES]


# --- the article's experiments ------------------------------------------------------------------

def test_images(test, n):
    """The first n held-out images (fewer if there are fewer) of the integer pixels `test` (`pixels`'),
    each pixel at its bin's centre, −1 + (k + ½)·2/256: the same pictures at every run."""
    return -1 + (np.asarray(test[:n], np.float32) + 0.5) * BIN


def reconstruct(fvae, x):
    """(x, G(E(x))): held-out images and their reconstructions from the posterior mean z = E(x)."""
    return x, keras.ops.convert_to_numpy(fvae.generator(fvae.encoder_net(x, training=False), training=False))


def interpolation_rows(fvae, x, steps=GRID):
    """Per pair of images: the straight line (row 2i) and the great circle (row 2i + 1) between their
    flow codes ε = F(E(x)), decoded by G(F⁻¹(ε))."""
    eps = keras.ops.convert_to_numpy(fvae.flow(fvae.encoder_net(x, training=False), training=False))
    return decode_codes(fvae.sampler, np.concatenate([interpolation_codes(eps[i], eps[i + 1], steps)
                                                      for i in range(0, len(eps) - 1, 2)]))


def experiments(args):
    """--sample-only / --score / --reconstruct / --interpolate / --iw: load --weights, write PNGs and figures."""
    fvae = build_fvae(**args.config)
    compile_fvae(fvae)  # evaluate() of the --iw report needs the compiled loss
    cli.load_weights(fvae.model, args)
    test = datasets(args, fvae.latent_dims)[1] if args.iw else None
    if args.reconstruct or args.interpolate:
        pixels_test = pixels(args)[1]
    if args.sample_only:
        write_samples(fvae.sampler, args, "fvae_samples", (args.std,) if args.std_given else TEMPERATURES)
    if args.score:  # at --std, else T = 1 (the README's grid)
        sample_score.score_samples("fvae", lambda z, _: (decode_codes(fvae.sampler, z) + 1) / 2,
                                   fvae.sampler.input_shape[-1], args.std if args.std_given else TEMPERATURES[0],
                                   n=args.score, seed=args.seed, out=args.out, data=args.data)
    if args.reconstruct:
        x, x_rec = reconstruct(fvae, test_images(pixels_test, RECONSTRUCT))
        path = os.path.join(args.out, "fvae_reconstruct.png")
        write_png(path, row_grid(np.stack([x, x_rec]), low=-1, high=1),
                  f"held-out images over G(E(x)); mean abs error {np.mean(np.abs(x - x_rec)):.3f}")
    if args.interpolate:
        x = test_images(pixels_test, 2 * args.interpolate)
        if len(x) < 2 * args.interpolate:
            raise UserError(f"--interpolate {args.interpolate}: needs {2 * args.interpolate} held-out images, "
                            f"there are {len(x)}")
        path = os.path.join(args.out, "fvae_interpolate.png")
        write_png(path, row_grid(interpolation_rows(fvae, x), low=-1, high=1))
    if args.iw:
        report(fvae, test, args)
    return 0


# --- command line -------------------------------------------------------------------------------

def parse_args(argv=None):
    p = cli.ArgumentParser(description="f-VAEs (a VAE with a Glow flow prior) on MNIST or an image folder.")
    cli.shape_arg(p, "--img-size", None, type=positive(int),
                  help="image side after centre crop and resize (64 for a folder; MNIST is 32)")
    cli.shape_arg(p, "--squeezes", 2, type=positive(int), help="the encoder's squeezes (each halves the side)")
    cli.shape_arg(p, "--blocks", 2, type=positive(int), help="residual blocks after each squeeze")
    cli.shape_arg(p, "--width", 64, type=positive(int), help="channels inside the residual blocks")
    cli.shape_arg(p, "--level", 2, type=positive(int), help="levels of the flow F on z")
    cli.shape_arg(p, "--depth", 4, type=positive(int), help="flow steps per level")
    cli.shape_arg(p, "--hidden", 64, type=positive(int), help="channels of the flow's coupling networks")
    p.add_argument("--data", help="folder of images (as glow.py) or an mnist.npz file. Default: MNIST "
                                  "zero-padded to 32×32")
    p.add_argument("--limit", type=positive(int), help="use only the first N training and N test images")
    p.add_argument("--steps-per-epoch", type=positive(int), help="default: one pass over the training images")
    p.add_argument("--std", type=non_negative, default=None,
                   help="temperature of --sample-only's grid (default: both 1.0 and 0.8)")
    p.add_argument("--reconstruct", action="store_true",
                   help="no training: held-out images over their reconstructions G(E(x)), OUT/fvae_reconstruct.png")
    p.add_argument("--interpolate", type=positive(int), default=0, metavar="N",
                   help="no training: N pairs of held-out images, the line and the great circle between their "
                        "flow codes F(E(x)), OUT/fvae_interpolate.png")
    p.add_argument("--iw", type=positive(int), default=0, metavar="K",
                   help="also the importance-weighted bound with K posterior samples: after training, or "
                        "with --sample-only/--reconstruct/--interpolate on --weights")
    p.add_argument("--iw-images", type=positive(int), default=500, metavar="N",
                   help="test images of the --iw bound (K forward passes each)")
    cli.add_run_args(p, weights="fvae.weights.h5", epochs=10, batch_size=64, lr=1e-3, seed=0)
    args = cli.parse(p, argv, model="fvae", uses_weights=("reconstruct", "interpolate"),
                     images=(32, 64), reads_data=("reconstruct", "interpolate", "iw"))
    args.std_given = args.std is not None
    check_size(args.img_size, args.squeezes, args.level)
    return args


def main(argv=None):
    return cli.run_script(parse_args, train, experiments, argv)


if __name__ == "__main__":
    sys.exit(main())
