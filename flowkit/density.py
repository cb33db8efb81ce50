"""The density formulas (docs/design.md §3): dequantization of integer pixels, bits per dimension, the
prior N(0, I) as the compiled loss, NormalNLL (a Gaussian term of a loss), and the bits/dim figure added to fit's epoch logs."""
import math

import keras
import numpy as np

from flowkit import pipeline


def dequantize(k, low, width, u=None):
    """Integer pixels k ∈ {0..255} -> x = low + (k + u)·width, u ~ U(0,1): the exact bin of
    docs/design.md §3. Numpy in, numpy out (u drawn here); inside a pipeline's transform pass your own u."""
    if u is None:
        k = np.asarray(k, dtype=np.float32)
        return (low + (k + np.random.uniform(size=k.shape)) * width).astype(keras.config.floatx())
    return low + (k + u) * width


def dequantization(low, width):
    """The transform of flowkit.pipeline.batches that dequantizes a batch of integer pixels k:
    x = low + (k + u)·width in floatx, u ~ U(0,1) drawn afresh at every pass."""
    def transform(k, r):
        k = r.cast(k, "float32")
        return r.cast(dequantize(k, low, width, r.uniform(r.shape(k))), keras.config.floatx())

    return transform


def dequantized(pixels, batch_size, low, width, **kwargs):
    """(x, dummy target) batches of integer pixels (an array or flowkit.pipeline.Elements), x dequantized
    with fresh u every time it is iterated (each epoch), so a loss over it is the exact dequantized NLL
    estimate of docs/design.md §3. The loss reads only the model's output: the target is zeros.
    `kwargs`: flowkit.pipeline.batches' shuffle, seed and repeat."""
    return pipeline.batches(pixels, batch_size, dequantization(low, width), **kwargs)


def bits_per_dim(nll_nats, dims, bin_width):
    """bpd = (NLL in nats − D·ln w) / (D·ln 2), NLL of the dequantized density with bin width w."""
    return (nll_nats - dims * math.log(bin_width)) / (dims * math.log(2))


def prior_nll(y_true, z):
    """−log N(z; 0, I) per image, 0.5·Σz² + 0.5·D·log 2π: the compiled loss of both scripts (the layers
    add their −log|det| with add_loss). y_true is a dummy; the constant is kept (docs/design.md §3)."""
    return 0.5 * keras.ops.sum(keras.ops.square(z), axis=-1) + prior_constant(z.shape[-1])


def prior_constant(dims):
    """0.5·D·log 2π: the part of −log N(z; 0, I) that does not depend on z (the NICE article drops it)."""
    return 0.5 * dims * math.log(2 * math.pi)


class BitsPerDim(keras.callbacks.Callback):
    """Adds `<key>_bpd` (bits/dim) to the epoch logs from `<key>` (a loss in nats per image).
    Put it before callbacks that read the logs."""

    def __init__(self, dims, bin_width, key="val_loss"):
        super().__init__()
        self.dims, self.bin_width, self.key = dims, bin_width, key

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.key in logs:
            name = self.key[:-len("loss")] + "bpd" if self.key.endswith("loss") else self.key + "_bpd"
            logs[name] = bits_per_dim(float(logs[self.key]), self.dims, self.bin_width)


class NormalNLL(keras.layers.Layer):
    """Identity on x that adds the batch mean of sign·(−log N(x; 0, I)) = sign·(0.5·Σx² + 0.5·D·log 2π)
    per image. Not a flow step: a density term of a loss that is not the compiled prior.

    f-VAE's negative ELBO has three Gaussian terms; the flow's prior on F(z) is the compiled loss
    (prior_nll), the other two are this layer: the reconstruction −log N(r) of the scaled
    residual r = (x − G(z))/σ_x (sign +1), and the posterior's log N(u) of its noise u (sign −1).
    """

    def __init__(self, sign=1.0, **kwargs):
        kwargs.setdefault("dtype", keras.config.dtype_policy().variable_dtype)  # float32 under a mixed policy
        super().__init__(**kwargs)
        self.sign = float(sign)

    def call(self, x):
        flat = keras.ops.reshape(x, (-1, math.prod(x.shape[1:])))
        self.add_loss(self.sign * keras.ops.mean(prior_nll(None, flat)))
        return x

    def get_config(self):
        return {**super().get_config(), "sign": self.sign}
