"""What one backend makes of the committed weights: `python tests/backend_probe.py OUT.npz [MODEL ...]`
under KERAS_BACKEND=... loads each model's weights/NAME.weights.h5 through its script's own command
line and builds, then writes to OUT.npz, per model: the decoder's x for fixed codes z (NumPy, seeded),
and the encoder's z and log-likelihood for fixed dequantized test digits. tests/test_backends.py runs it
on every installed backend and compares the files: one weights file, the same numbers everywhere."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

import flowkit  # noqa: E402,F401  (TensorFlow, where it runs, starts quietly)
import keras  # noqa: E402
import numpy as np  # noqa: E402

import fvae  # noqa: E402
import glow  # noqa: E402
import iresnet  # noqa: E402
import nice  # noqa: E402
import tarflow  # noqa: E402
from flow_layers import log_det_estimator  # noqa: E402
from flowkit import cli  # noqa: E402
from flowkit.density import prior_nll  # noqa: E402
from flowkit.files import old_tarblock_path  # noqa: E402
from flowkit.sample import compiled  # noqa: E402  (one graph per decoder: on JAX not op by op)
from helpers import mnist_digits  # noqa: E402

N = 3  # images and codes per model


def numpy(x):
    return keras.ops.convert_to_numpy(x).astype(np.float64)


def digits(side, low, width):
    """N held-out digits (padded to side × side), dequantized with fixed u: low + (k + u)·width."""
    k = mnist_digits()[-N:].astype(np.float64)
    pad = (side - 28) // 2
    k = np.pad(k, ((0, 0), (pad, pad), (pad, pad)))[..., None]
    u = np.random.RandomState(1).uniform(size=k.shape)
    return (low + (k + u) * width).astype("float32")


def codes(dims):
    return (0.7 * np.random.RandomState(0).standard_normal((N, dims))).astype("float32")


def mean_nll(model, inputs, z):
    """−log q(x), mean over the batch: the prior term of z plus the add_loss terms of the call."""
    return float(np.mean(numpy(prior_nll(None, z)))) + sum(float(numpy(l)) for l in model.losses)


def probe_nice(args):
    encoder, decoder, _ = nice.build_nice(args.hidden, args.hidden_layers, args.couplings)
    cli.load_weights(encoder, args)
    x = digits(28, 0, 1 / 256).reshape(N, -1)
    z = encoder(x, training=False)
    return {"x": numpy(compiled(decoder)(codes(nice.DIM))), "z": numpy(z), "nll": mean_nll(encoder, x, z)}


def probe_glow(args):
    encoder, decoder = glow.build_glow(**glow.shape(args.config))
    cli.load_weights(encoder, args)
    x = digits(32, -1, 2 / 256)
    z = encoder(x, training=False)
    return {"x": numpy(compiled(decoder)(codes(z.shape[-1]))), "z": numpy(z), "nll": mean_nll(encoder, x, z)}


def probe_tarflow(args):
    encoder, decoder, _ = tarflow.build_tarflow(**args.config)
    cli.load_weights(encoder, args, rename=old_tarblock_path)
    x = digits(28, -1, 2 / 256)
    y = np.arange(N, dtype="int32")
    inputs = [x, y] if args.conditional else x
    z = encoder(inputs, training=False)
    c = codes(z.shape[-1])
    return {"x": numpy(compiled(decoder)([c, y] if args.conditional else c)), "z": numpy(z),
            "nll": mean_nll(encoder, inputs, z)}


def probe_iresnet(args):
    encoder, decoder, flow = iresnet.build_iresnet(**iresnet.model_config(args))
    cli.load_weights(encoder, args)
    x = digits(28, 0, 1 / 256)[:1]
    with log_det_estimator(flow, "exact", 1):  # the estimators draw backend-specific noise; the Jacobian does not
        z, log_det = flow(x, training=False, return_log_det=True)
    nll = float(np.mean(numpy(prior_nll(None, z) - log_det)))
    return {"x": numpy(compiled(decoder)(codes(z.shape[-1]))), "z": numpy(z), "nll": nll}


def probe_fvae(args):
    model = fvae.build_fvae(**args.config)
    cli.load_weights(model.model, args)
    x = digits(32, -1, 2 / 256)
    eps = model.flow(model.encoder_net(x, training=False), training=False)
    return {"x": numpy(compiled(model.sampler)(codes(model.latent_dims))), "z": numpy(eps)}


PROBES = {"nice": probe_nice, "glow": probe_glow, "fvae": probe_fvae, "iresnet": probe_iresnet,
          "tarflow": probe_tarflow}
SCRIPTS = {"nice": nice, "glow": glow, "fvae": fvae, "iresnet": iresnet, "tarflow": tarflow}


def main(out, models):
    found = {}
    for name in models:
        weights = os.path.join(ROOT, "weights", f"{name}.weights.h5")
        args = SCRIPTS[name].parse_args(["--weights", weights, "--sample-only", "--out", os.path.dirname(out)])
        for key, value in PROBES[name](args).items():
            found[f"{name}/{key}"] = value
    np.savez(out, backend=keras.backend.backend(), **found)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or list(PROBES))
