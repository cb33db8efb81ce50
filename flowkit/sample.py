"""Sampling and pictures: codes at a temperature, batched decoding, the straight line and the great
circle between two codes, image grids, the grid a training run draws after each epoch."""
import math

import keras
import numpy as np

from flowkit import backend
from flowkit.files import UserError, save_png


def parse_temperatures(text, flag="--temperatures"):
    """'0,0.5,0.7' -> [0.0, 0.5, 0.7]: the --temperatures list (standard deviations of z, each ≥ 0),
    or another `flag`'s list of numbers ≥ 0."""
    try:
        temps = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected numbers separated by commas, e.g. 0,0.5,0.7,1") from None
    if not temps or not all(t >= 0 and math.isfinite(t) for t in temps):
        raise UserError(f"{flag} {text!r}: expected one or more numbers ≥ 0, e.g. 0,0.5,0.7,1")
    return temps


def temperature_codes(temperatures, n, dims, seed=0):
    """(len(temperatures), n, dims): row i is temperatures[i]·ε_j for the same n directions ε_j ~ N(0, I)
    in every row, so a column shows one z direction at rising temperature (row 0 at T = 0: the mode)."""
    eps = np.random.RandomState(seed).standard_normal((n, dims))
    return np.stack([t * eps for t in temperatures]).astype(keras.config.floatx())


def variables_read(model):
    """Every variable a call of `model` reads: its own `variables`, and those of the layers its layers
    hold as plain attributes that Keras does not track — a flow layer's `inverse()` runs its forward
    layer through such a reference, so a decoder's own `variables` is empty."""
    found, seen, visited, todo = [], set(), set(), [model]
    while todo:
        layer = todo.pop()
        if id(layer) in visited:
            continue
        visited.add(id(layer))
        for v in layer.variables:
            if id(v) not in seen:
                seen.add(id(v))
                found.append(v)
        # PyTorch's Module keeps a sub-layer held alone in `_modules`, not in the instance's __dict__
        held = [*vars(layer).values(), *(getattr(layer, "_modules", None) or {}).values()]
        for value in held:
            todo += [v for v in (value if isinstance(value, (list, tuple)) else [value])
                     if isinstance(v, keras.layers.Layer)]
    return found


def compiled(model, key=(), jit_compile=False, call=None):
    """model(inputs, training=False), or `call`, compiled once (flowkit.backend.function over the
    variables the model reads, `variables_read`: a tf.function, or on JAX a jitted program that reads the
    weights as they are at each call, so it follows training and loaded weights): one per `key`, kept on
    the model. A decoder's layers then run as one graph instead of op by op: Glow's 9×9 epoch grid ×9
    faster on a CPU. `key` names what the layers read in Python when they trace (TarFlow's guidance and
    key-value cache), so another setting traces anew."""
    cache = model.__dict__.get("compiled_calls")
    if cache is None:
        cache = {}
        object.__setattr__(model, "compiled_calls", cache)  # untracked by Keras
    if key not in cache:
        cache[key] = backend.function(call or (lambda v: model(v, training=False)), variables_read(model),
                                      xla=jit_compile)
    return cache[key]


def decode_codes(decoder, z, batch=1024):
    """Codes (..., D) -> the decoder's outputs (..., *shape) as numpy, decoded in batched calls of one
    compiled graph (`compiled`)."""
    z = np.asarray(z, keras.config.floatx())
    flat = z.reshape(-1, z.shape[-1])
    call = compiled(decoder)
    x = np.concatenate([keras.ops.convert_to_numpy(call(flat[i:i + batch]))
                        for i in range(0, len(flat), batch)])
    return x.reshape(*z.shape[:-1], *x.shape[1:])


def sample(decoder, n, std, seed=0):
    """n samples decoder(std·ε), ε ~ N(0, I) seeded: the article's sampling with temperature std."""
    return decode_codes(decoder, temperature_codes([std], n, decoder.input_shape[-1], seed)[0])


def slerp(a, b, t):
    """Great-circle interpolation between codes a and b (vectors) at fractions t (array):
    sin((1−t)Ω)/sin Ω·a + sin(tΩ)/sin Ω·b, Ω the angle between them. Codes of real images have norm
    ≈ √D, where N(0, I) puts its mass; the straight line between two of them cuts inside that shell
    (its midpoint has norm ≈ √(D/2) for orthogonal codes), the great circle stays near it. The ends are
    a and b exactly; parallel codes fall back to the straight line."""
    a, b, t = np.asarray(a, np.float64), np.asarray(b, np.float64), np.asarray(t, np.float64)[:, None]
    cos = np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))
    omega = np.arccos(np.clip(cos, -1.0, 1.0))
    if np.sin(omega) < 1e-6:
        return (1 - t) * a + t * b
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


def interpolation_codes(za, zb, steps):
    """(2, steps, D): the straight line and the great circle from za to zb (both ends included, exact)."""
    t = np.linspace(0.0, 1.0, steps)
    linear = (1 - t[:, None]) * np.asarray(za, np.float64) + t[:, None] * np.asarray(zb, np.float64)
    paths = np.stack([linear, slerp(za, zb, t)])
    paths[:, 0], paths[:, -1] = za, zb  # the formulas give them up to rounding; the test wants the images back
    return paths.astype(keras.config.floatx())


def image_grid(images, n, low=0.0, high=1.0):
    """n×n images (n², h, w[, c]) with values in [low, high] -> one uint8 picture, clipped."""
    images = np.asarray(images)[: n * n]
    return row_grid(images.reshape(n, n, *images.shape[1:]), low, high)


def row_grid(rows, low=0.0, high=1.0):
    """Images laid out as rows × columns (r, c, h, w[, ch]) with values in [low, high] -> one uint8
    picture, clipped (grey when ch is 1 or absent)."""
    rows = np.asarray(rows)
    r, c, h, w = rows.shape[:4]
    rest = rows.shape[4:]
    grid = rows.swapaxes(1, 2).reshape(r * h, c * w, *rest)
    grid = (grid - low) / (high - low) * 255
    grid = np.clip(np.round(grid), 0, 255).astype(np.uint8)
    return grid[..., 0] if grid.ndim == 3 and grid.shape[-1] == 1 else grid


class EpochGrid(keras.callbacks.Callback):
    """After every `every`-th epoch: the picture `draw()` returns (a uint8 grid, e.g. image_grid's) to
    `path_pattern`.format(epoch=N), N counted from 1 (`"OUT/nice_epoch_{epoch:03d}.png"`), quietly: the
    per-epoch samples of every script's training run (tools.curves --grids scores them)."""

    def __init__(self, draw, path_pattern, every=1):
        super().__init__()
        self.draw, self.path_pattern, self.every = draw, path_pattern, int(every)

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every == 0:
            save_png(self.path_pattern.format(epoch=epoch + 1), self.draw())
