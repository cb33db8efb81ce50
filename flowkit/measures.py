"""The measures of generated digits, on a small MNIST digit classifier (its weights committed:
weights/digit_classifier.weights.h5; loading never trains):

- the inception score of Salimans et al. 2016 ("Improved Techniques for Training GANs"), with the
  classifier in place of Inception,

      IS = exp( E_x KL( p(y|x) ‖ p(y) ) ),   p(y) = E_x p(y|x),

  the expectations over the samples. It is high when each sample is one clear digit (p(y|x) peaked)
  and the samples cover the digits (p(y) flat): between 1 and 10. Alongside it: the share of confident
  samples (max p(y|x) ≥ 0.9), the number of distinct classes, and for a class-conditional grid the
  share classified as the intended digit. The real held-out digits give the ceiling to compare with;
- for many samples (a script's --score N), on the classifier's features: the Fréchet distance to the
  held-out digits (FID, with real training digits' as its floor), and precision and recall
  (Kynkäänniemi et al. 2019: are the samples real-looking digits; are all the real digits drawn).

flowkit.score scores a run's samples with them and is their command line (`python -m flowkit.score`).
"""
import contextlib
import io
import math
import os

import keras
import numpy as np

from flowkit import backend
from flowkit.data import load_mnist
from flowkit.files import UserError, save_weights_atomic

WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights", "digit_classifier.weights.h5")
CONFIDENT = 0.9   # max p(y|x) at or above this counts as a confident sample
STEPS = 4000      # optimizer steps of --train, whatever the training set's size
BATCH = 64
SHIFT = 2         # augmentation: random shifts of up to this many pixels each way


# --- the classifier ------------------------------------------------------------------------------

def build_classifier():
    """Conv 32 → pool → Conv 64 → pool → dropout → dense: logits of the 10 digits for (n, 28, 28, 1)
    images in [0, 1]. ~50k weights (~0.2 MB)."""
    L = keras.layers
    f32 = "float32"  # the scripts may set a mixed bfloat16 policy; the score must not depend on it
    inputs = keras.Input((28, 28, 1), dtype=f32)
    x = L.Conv2D(32, 3, padding="same", activation="relu", dtype=f32)(inputs)
    x = L.MaxPooling2D(dtype=f32)(x)
    x = L.Conv2D(64, 3, padding="same", activation="relu", dtype=f32)(x)
    x = L.MaxPooling2D(dtype=f32)(x)
    x = L.Flatten(dtype=f32)(x)
    x = L.Dropout(0.4, dtype=f32)(x)
    outputs = L.Dense(10, dtype=f32)(x)
    return keras.Model(inputs, outputs, name="digit_classifier")


_classifier = None


def classifier():
    """The trained classifier, loaded once per process from WEIGHTS."""
    global _classifier
    if _classifier is None:
        if not os.path.isfile(WEIGHTS):
            raise UserError(f"{WEIGHTS}: no classifier weights; run `python -m flowkit.score --train`")
        model = build_classifier()
        model.load_weights(WEIGHTS)
        _classifier = model
    return _classifier


def shifted(x, rng, shift=SHIFT):
    """Each image moved by its own random (dy, dx) in [-shift, shift]², the edges zero-filled."""
    n, h, w = x.shape
    padded = np.pad(x, ((0, 0), (shift, shift), (shift, shift)))
    dy, dx = rng.randint(0, 2 * shift + 1, (2, n))
    return np.stack([padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def train(seed=0, path=WEIGHTS, steps=STEPS):
    """Trains the classifier on load_mnist's training digits (seeded, deterministic as far as the
    backend allows), writes its weights atomically to `path`, returns its held-out accuracy."""
    global _classifier
    keras.utils.set_random_seed(seed)
    backend.deterministic_ops()
    (x_train, y_train), (x_test, y_test) = load_mnist(labels=True)
    model = build_classifier()
    epochs = max(1, math.ceil(steps * BATCH / len(x_train)))
    schedule = keras.optimizers.schedules.CosineDecay(2e-3, epochs * math.ceil(len(x_train) / BATCH))
    model.compile(keras.optimizers.Adam(schedule),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    rng = np.random.RandomState(seed)
    for epoch in range(epochs):
        order = rng.permutation(len(x_train))
        x, y = shifted(x_train[order], rng)[..., None].astype(np.float32) / 255, y_train[order]
        totals = np.zeros(2)
        for i in range(0, len(x), BATCH):  # train_on_batch: fit's tf.data pipeline spams stderr on every call
            logs = model.train_on_batch(x[i:i + BATCH], y[i:i + BATCH], return_dict=True)
            totals += len(y[i:i + BATCH]) * np.array([logs["loss"], logs["accuracy"]])
        if (epoch + 1) % max(1, epochs // 8) == 0 or epoch + 1 == epochs:
            loss, acc = totals / len(x)
            print(f"epoch {epoch + 1}/{epochs}: loss {loss:.4f}, train accuracy {acc:.4f}", flush=True)
    # a fresh copy: the compiled model's weights file would also hold Adam's two moments (3× the size)
    _classifier = build_classifier()
    _classifier.set_weights(model.get_weights())
    accuracy = float(np.mean(np.argmax(_logits(x_test), axis=1) == y_test))
    save_weights_atomic(_classifier, path, {"model": "flow_score.digit_classifier", "seed": seed,
                                            "steps": steps, "train_digits": len(x_train),
                                            "held_out_digits": len(x_test), "held_out_accuracy": accuracy})
    return accuracy


# --- the score -----------------------------------------------------------------------------------

def _as_digits(images):
    """(n, 28, 28, 1) float32 in [0, 1] from the accepted forms (see score)."""
    x = np.asarray(images)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim != 3 or x.shape[1:] not in ((28, 28), (32, 32)) or len(x) == 0:
        raise UserError(f"images must be n > 0 digits of shape (n, 28, 28[, 1]) or (n, 32, 32[, 1]), "
                        f"got shape {x.shape}")
    if x.shape[1] == 32:
        x = x[:, 2:30, 2:30]  # glow.py's MNIST: 28×28 zero-padded by 2 pixels each side
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255
    elif x.dtype.kind in "fb":
        # a diverged model's NaN or inf samples score as the images they become, not as a crash
        x = np.clip(np.nan_to_num(x.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    else:
        raise UserError(f"images must be floats in [0, 1] or uint8 0..255, got {x.dtype}")
    return x[..., None]


def _logits(images, batch=1000):
    x = _as_digits(images)
    model = classifier()
    return np.concatenate([keras.ops.convert_to_numpy(model(x[i:i + batch], training=False))
                           for i in range(0, len(x), batch)]).astype(np.float64)


def probabilities(images):
    """p(y|x): (n, 10) float64, the classifier's softmax, for images in any form score accepts."""
    logits = _logits(images)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def score(images, rows=None):
    """The score of n digit images: floats in [0, 1] or uint8 0..255, of shape (n, 28, 28[, 1]), or
    (n, 32, 32[, 1]) (the centre 28×28 is scored). A dict: `confident` (share with max p(y|x) ≥ 0.9),
    `inception` (exp E_x KL(p(y|x) ‖ p(y))), `classes` (distinct argmax classes), and with `rows`
    (rows[i] the intended digit of image i) `row_accuracy` (share classified as intended)."""
    logits = _logits(images)
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    p_y = p.mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(p > 0, p * (log_p - np.log(p_y)), 0.0).sum(axis=1)
    labels = np.argmax(p, axis=1)
    result = {"confident": float(np.mean(p.max(axis=1) >= CONFIDENT)),
              "inception": float(np.exp(kl.mean())),
              "classes": int(len(np.unique(labels)))}
    if rows is not None:
        rows = np.asarray(rows)
        if rows.shape != labels.shape or rows.dtype.kind not in "iu" or rows.min() < 0 or rows.max() > 9:
            raise UserError(f"rows must hold one intended digit 0..9 per image ({len(labels)}), "
                            f"got {rows.dtype} {rows.shape}")
        result["row_accuracy"] = float(np.mean(labels == rows))
    return result


def in_words(s):
    """A score dict as one line: `confident 0.94, IS 9.41, 10 classes[, row accuracy 0.97]`."""
    line = f"confident {s['confident']:.2f}, IS {s['inception']:.2f}, {s['classes']} classes"
    return line + (f", row accuracy {s['row_accuracy']:.2f}" if "row_accuracy" in s else "")


_ceilings = {}


def real_digit_ceiling(data=None):
    """The score of the real held-out digits (computed once per process): those of `data` (an npz in
    keras' mnist.npz layout), else load_mnist's."""
    if data not in _ceilings:
        with contextlib.redirect_stdout(io.StringIO()):  # a training run has already said where MNIST came from
            _, x_test = load_mnist(data)
        _ceilings[data] = score(x_test)
    return _ceilings[data]


def score_line(images, rows=None, data=None):
    """`sample score: ... (real held-out digits: ...)`: the line a training run prints (`data`: its npz)."""
    return (f"sample score: {in_words(score(images, rows))} "
            f"(real held-out digits: {in_words(real_digit_ceiling(data))})")


# --- many samples against the held-out digits: FID, precision and recall ---------------------------

K_NEAREST = 3       # the neighbourhood of precision and recall (Kynkäänniemi et al. 2019's k = 3)
_features = None    # (the classifier, its feature model)


def features(images, batch=1000):
    """The classifier's features of digit images (any form `score` accepts): (n, 3136) float64, the
    flattened second pooling that its last Dense layer reads, as FID reads Inception's pool features."""
    global _features
    model = classifier()
    if _features is None or _features[0] is not model:
        flat = next(layer for layer in model.layers if isinstance(layer, keras.layers.Flatten))
        _features = (model, keras.Model(model.input, flat.output))
    x = _as_digits(images)
    return np.concatenate([keras.ops.convert_to_numpy(_features[1](x[i:i + batch], training=False))
                           for i in range(0, len(x), batch)]).astype(np.float64)


def frechet_distance(a, b):
    """The Fréchet distance between Gaussians fitted to two sets of features a (n, d), b (m, d), FID
    (Heusel et al. 2017):  ‖μ_a − μ_b‖² + tr Σ_a + tr Σ_b − 2·tr (Σ_a Σ_b)^½.
    With A, B the centred features, Σ_a = AᵀA/(n−1), Σ_b = BᵀB/(m−1); Σ_a Σ_b = Aᵀ(ABᵀB)/c has the
    non-zero eigenvalues of (ABᵀB)Aᵀ/c = (ABᵀ)(ABᵀ)ᵀ/c (XY and YX share them), c = (n−1)(m−1): the
    squared singular values of ABᵀ/√c. So the last trace is the nuclear norm of ABᵀ/√c, exact and
    real, from an n×m SVD instead of the square root of a d×d matrix."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise UserError(f"FID needs at least 2 images in each set, got {len(a)} and {len(b)}")
    A, B = a - a.mean(axis=0), b - b.mean(axis=0)
    c = (len(a) - 1) * (len(b) - 1)
    cross = np.linalg.svd(A @ B.T, compute_uv=False).sum() / math.sqrt(c)
    mean = np.sum((a.mean(axis=0) - b.mean(axis=0)) ** 2)
    return float(max(0.0, mean + np.sum(A * A) / (len(a) - 1) + np.sum(B * B) / (len(b) - 1) - 2 * cross))


def _distances(a, b):
    """Euclidean distances (len(a), len(b)) between rows."""
    d2 = (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None] - 2 * a @ b.T
    return np.sqrt(np.maximum(d2, 0.0))


def knn_radii(f, k=K_NEAREST, chunk=1000):
    """Each row's distance to its k-th nearest other row of f (itself, at distance 0, is the 0-th)."""
    if len(f) <= k:
        raise UserError(f"precision and recall with k = {k} need more than {k} images, got {len(f)}")
    return np.concatenate([np.partition(_distances(f[i:i + chunk], f), k, axis=1)[:, k]
                           for i in range(0, len(f), chunk)])


def manifold_share(points, ref, radii, chunk=1000):
    """The share of `points` inside the k-NN manifold of `ref`: the union of the balls around each
    ref[j] of radius radii[j] (its k-th neighbour's distance)."""
    return float(np.mean(np.concatenate([np.any(_distances(points[i:i + chunk], ref) <= radii[None], axis=1)
                                         for i in range(0, len(points), chunk)])))


def precision_recall(real, fake, k=K_NEAREST):
    """(precision, recall) of Kynkäänniemi et al. 2019 on features: the share of `fake` inside the
    real k-NN manifold (good samples), and the share of `real` inside the samples' (all digits drawn)."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    return manifold_share(fake, real, knn_radii(real, k)), manifold_share(real, fake, knn_radii(fake, k))


_real = {}


def real_features(data=None):
    """(the held-out digits' features, the training digits) of `data` (load_mnist's), once per process."""
    if data not in _real:
        with contextlib.redirect_stdout(io.StringIO()):  # where MNIST came from was said, or does not matter
            x_train, x_test = load_mnist(data)
        _real[data] = (features(x_test), x_train)
    return _real[data]


def fidelity(images, data=None):
    """FID, precision and recall of n digit images against the held-out digits (of `data`, else
    load_mnist's), and `fid_real`, the floor: the FID of n real training digits (all, if fewer)
    against the same held-out digits. FID's bias grows as n shrinks, so the floor takes as many."""
    fake = features(images)
    real, x_train = real_features(data)
    precision, recall = precision_recall(real, fake)
    return {"fid": frechet_distance(fake, real), "fid_real": frechet_distance(features(x_train[:len(fake)]), real),
            "precision": precision, "recall": recall}


def sample_line(images, data=None):
    """`sample score (N samples): FID F (real digits: F0), precision P, recall R, IS I, confident C`."""
    f, s = fidelity(images, data), score(images)
    return (f"sample score ({len(images)} samples): FID {f['fid']:.1f} (real digits: {f['fid_real']:.1f}), "
            f"precision {f['precision']:.3f}, recall {f['recall']:.3f}, IS {s['inception']:.2f}, "
            f"confident {s['confident']:.2f}")
