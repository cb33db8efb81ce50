"""Input pipelines: the batches a script hands to `fit`, one design for every backend (docs/design.md §5).

    batches    (inputs, dummy target) batches of arrays or image files, a per-batch transform applied
    Elements   a source that only tf.data reads (files decoded as read, a tf.data cache file)
    NumpyOps   the transforms' namespace on the NumPy path; also noise for one array, here and now
    first      the first n examples' model inputs of a pipeline, as NumPy
    tf_data    which kind: tf.data on the TensorFlow backend, a PyDataset of NumPy batches elsewhere

On the TensorFlow backend a pipeline is tf.data, as fast as ever (index shuffles, a batched gather,
parallel maps, prefetch). On JAX and PyTorch, with or without TensorFlow installed, it is a
`keras.utils.PyDataset` of NumPy batches. A transform (dequantization, Glow's input, f-VAE's u,
TarFlow's noise and labels) is written once, against a namespace `r` of cast, shape, uniform, normal
and zeros: TensorFlow's ops and a stateful tf.random.Generator there, NumPy and a Generator here. On
both the noise is fresh at every pass and the shuffles follow the seed.
"""
import threading

import keras
import numpy as np

from flowkit import backend


def tf_data():
    """True on the TensorFlow backend, where pipelines are tf.data; elsewhere they are NumPy PyDatasets."""
    return backend.name() == "tensorflow"


class Elements:
    """n elements that only tf.data reads: `make(shuffle, seed)` returns one pass as a dataset of single
    elements, shuffled when asked (an image folder decoded as it is read, a tf.data cache file)."""

    def __init__(self, n, make):
        self.n, self.make = n, make

    def __len__(self):
        return self.n


class NumpyOps:
    """The namespace of a transform on the NumPy path: NumPy, and noise from a Generator seeded by
    `seed` (drawn from NumPy's global generator when None, so --seed repeats a run)."""

    def __init__(self, seed=None):
        self.rng = np.random.default_rng(np.random.randint(2**31) if seed is None else seed)
        self.lock = threading.Lock()  # PyDataset workers are threads

    cast = staticmethod(lambda x, dtype: np.asarray(x, dtype))
    shape = staticmethod(np.shape)

    def uniform(self, shape):
        """U(0, 1), float32."""
        with self.lock:
            return self.rng.random(tuple(shape), dtype=np.float32)

    def normal(self, shape):
        """N(0, 1), float32."""
        with self.lock:
            return self.rng.standard_normal(tuple(shape), dtype=np.float32)

    @staticmethod
    def zeros(shape):
        return np.zeros(tuple(shape), np.float32)


class _TFOps:
    """The namespace of a transform inside a tf.data map: TensorFlow's ops; the noise from a stateful
    generator, because a seeded tf.random op in a map repeats its numbers at every pass (--seed)."""

    def __init__(self):
        import tensorflow as tf

        self.tf, self.generator = tf, tf.random.Generator.from_seed(np.random.randint(2**31))

    def cast(self, x, dtype):
        return self.tf.cast(x, dtype)

    def shape(self, x):
        return self.tf.shape(x)

    def uniform(self, shape):
        return self.generator.uniform(shape)

    def normal(self, shape):
        return self.generator.normal(shape)

    def zeros(self, shape):
        return self.tf.zeros(shape)


def _arrays(source):
    return tuple(source) if isinstance(source, (tuple, list)) else (source,)


def _prepare(rows, transform, r):
    """(model inputs, zeros per example): the loss reads only the model's output."""
    batch = rows if len(rows) > 1 else rows[0]
    inputs = transform(batch, r) if transform else batch
    return inputs, r.zeros(r.shape(rows[0])[:1])


def batches(source, batch_size, transform=None, shuffle=False, seed=None, repeat=False):
    """(inputs, dummy target) batches of `source`: an array, a tuple of arrays (one element = one row of
    each), or Elements. `transform(batch, r)` maps a batch (an array, or a tuple like the source's) to
    the model's inputs, with the namespace `r` (NumpyOps or TensorFlow's); None passes it through.
    `shuffle`: a new order at every pass (from `seed`) and whole batches only, since a last smaller
    batch would trace the training step again; else one pass in order, the last batch smaller.
    `repeat`: endless, the passes joined (fit needs `steps_per_epoch`). tf.data on the TensorFlow
    backend, a keras.utils.PyDataset of NumPy batches elsewhere."""
    if tf_data():
        return _tf_batches(source, batch_size, transform, shuffle, seed, repeat)
    return NumpyBatches(source, batch_size, transform, shuffle, seed, repeat)


def _tf_batches(source, batch_size, transform, shuffle, seed, repeat):
    import tensorflow as tf

    r, auto = _TFOps(), tf.data.AUTOTUNE
    if isinstance(source, Elements):
        ds, take = source.make(shuffle, seed), lambda *rows: rows
    else:  # shuffle indices, not the arrays (no buffer of images), and gather whole batches
        arrays = tuple(tf.constant(a) for a in _arrays(source))
        ds, take = tf.data.Dataset.range(len(arrays[0])), lambda i: tuple(tf.gather(a, i) for a in arrays)
        if shuffle:
            ds = ds.shuffle(len(arrays[0]), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=shuffle)
    # one map call at a time: the calls share one noise generator, and parallel calls would take its
    # numbers in a varying order, so a --seed run (and a picture of held-out images) would not repeat
    return ds.map(lambda *b: _prepare(take(*b), transform, r)).prefetch(auto)


def elements(source, shuffle=False, seed=None, repeat=False):
    """tf.data only: the elements of `source` one by one (shuffled at every pass with `shuffle`, endless
    with `repeat`), for code that batches them itself."""
    import tensorflow as tf

    if isinstance(source, Elements):
        ds = source.make(shuffle, seed)
    else:
        arrays = tuple(tf.constant(a) for a in _arrays(source))
        ds = tf.data.Dataset.range(len(arrays[0]))
        if shuffle:
            ds = ds.shuffle(len(arrays[0]), seed=seed, reshuffle_each_iteration=True)
        ds = ds.map(lambda i: tuple(tf.gather(a, i) for a in arrays) if len(arrays) > 1 else tf.gather(arrays[0], i))
    return ds.repeat() if repeat else ds


class NumpyBatches(keras.utils.PyDataset):
    """`batches` on the NumPy path: batch i holds elements i·b … (i+1)·b − 1 of the stream of passes,
    each pass a permutation drawn from (seed, pass) when shuffling, the transform's noise drawn afresh
    at every call. Finite (not `repeat`), a pass is an epoch: fit's on_epoch_end, or the end of a
    `for` loop over it, moves on to the next pass's order."""

    def __init__(self, source, batch_size, transform=None, shuffle=False, seed=None, repeat=False, **kwargs):
        super().__init__(**kwargs)
        if isinstance(source, Elements):
            raise TypeError("Elements are read by tf.data only; the NumPy path takes arrays")
        self.arrays, self.batch_size, self.transform = _arrays(source), batch_size, transform
        self.n, self.shuffle, self.repeat = len(self.arrays[0]), shuffle, repeat
        self.seed = np.random.randint(2**31) if seed is None else seed
        self.r, self.epoch, self._orders = NumpyOps(), 0, {}

    @property
    def num_batches(self):
        if self.repeat:
            return None
        return self.n // self.batch_size if self.shuffle else -(-self.n // self.batch_size)

    def __len__(self):
        if self.repeat:
            raise TypeError("an endless stream has no length")
        return self.num_batches

    def _order(self, p):
        if not self.shuffle:
            return np.arange(self.n)
        if p not in self._orders:  # a batch spans at most two passes: keep the last two orders
            self._orders = {q: o for q, o in self._orders.items() if q == p - 1}
            self._orders[p] = np.random.default_rng([self.seed, p]).permutation(self.n)
        return self._orders[p]

    def __getitem__(self, i):
        if not self.repeat and not 0 <= i < self.num_batches:
            raise IndexError(i)
        start = i * self.batch_size + (0 if self.repeat else self.epoch * self.n)
        stop = start + self.batch_size if self.repeat else min(start + self.batch_size, (self.epoch + 1) * self.n)
        e = np.arange(start, stop)
        passes = e // self.n
        index = np.concatenate([self._order(p)[e[passes == p] % self.n] for p in np.unique(passes)])
        return _prepare(tuple(a[index] for a in self.arrays), self.transform, self.r)

    def on_epoch_end(self):
        if not self.repeat:
            self.epoch += 1

    def __iter__(self):
        yield from super().__iter__()
        self.on_epoch_end()


def first(batches_, n=None):
    """The model inputs of the first n examples (all with None) of a pipeline, as NumPy: an array, or
    a tuple of arrays for a model of several inputs."""
    parts, seen = [], 0
    for inputs, _ in batches_:
        inputs = tuple(np.asarray(a) for a in inputs) if isinstance(inputs, (tuple, list)) else (np.asarray(inputs),)
        parts.append(inputs)
        seen += len(inputs[0])
        if n is not None and seen >= n:
            break
    out = tuple(np.concatenate(p)[:n] for p in zip(*parts))
    return out if len(out) > 1 else out[0]
