"""What a long training run needs around `fit`, once for every script (DESIGN §1): the shared
command line and its checks, the architecture record kept inside the weights file, the best weights
and the collapse rule, Ctrl-C, per-epoch backups and --resume, the distribution strategy and
chief-only writes, the epoch log. A script declares its flags (`shape_arg`, `add_run_args`), then
`parse`, and hands `run_script` its train(args, strategy) and experiments(args); train calls
`check_training` and `train`. Everything here is the same for every model of the series. Arrows point one way: scripts -> flow_train ->
flow_utils.
"""
import argparse
import json
import math
import os
import signal
import sys
import tempfile
import time
import warnings

# flow_utils first: TensorFlow loads there with its start-up notices kept off stderr
from flow_utils import UserError, _atomic, read_config, save_weights_atomic  # isort: skip

import keras  # noqa: E402


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


# --- the command line every script shares ---------------------------------------------------------

def positive(kind):
    """argparse type: a number of `kind` (int or float) > 0."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def non_negative(text):
    """argparse type: a float ≥ 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {text}")
    return value


def shape_arg(parser, flag, default, **kwargs):
    """A flag that shapes the model. Its value is recorded inside the weights file, so after training
    it is optional: `parse` takes it from the record, and an explicit value that contradicts the
    record is an error. Without a record it falls back to `default`."""
    action = parser.add_argument(flag, default=None, **kwargs)
    action.help = f"{action.help or ''} (default: {default}; read from --weights' record when not given)"
    if not hasattr(parser, "shape_defaults"):
        parser.shape_defaults = {}
    parser.shape_defaults[action.dest] = default


def add_run_args(parser, *, weights, epochs, batch_size, lr, seed=None, bf16_default=False):
    """The flags of a training run, the same in every script: --epochs --batch-size --lr --weights
    --resume --max-collapses --seed --out --sample-only, and the scale-out flags. `bf16_default`: the
    model computes in mixed bfloat16 unless told otherwise, on a CPU with bfloat16 instructions
    (`choose_precision`; bench.py measured where it pays and costs no likelihood)."""
    p = parser
    p.set_defaults(bf16_default=bf16_default)
    p.add_argument("--epochs", type=positive(int), default=epochs, help="training epochs (the total with --resume)")
    p.add_argument("--batch-size", type=positive(int), default=batch_size, help="images per batch (global)")
    p.add_argument("--lr", type=positive(float), default=lr, help="learning rate")
    p.add_argument("--weights", default=weights,
                   help="the best weights are kept here, with the architecture record; read back by "
                        "every mode that does not train. Must end in .weights.h5")
    p.add_argument("--sample-only", action="store_true", help="no training: load --weights, write the sample grid")
    p.add_argument("--resume", action="store_true",
                   help="continue the run of --weights from its last completed epoch (backups in "
                        "NAME.run/ beside NAME.weights.h5); --epochs is the total")
    p.add_argument("--max-collapses", type=positive(int), default=5, metavar="N",
                   help="stop (exit code 3) after N non-finite losses, each answered by reloading "
                        "the best weights at a low learning rate")
    p.add_argument("--seed", type=int, default=seed, help="random seed (numpy, TensorFlow, Keras)")
    p.add_argument("--out", default="samples", help="folder for the pictures")
    p.add_argument("--minutes", type=positive(float), default=None, metavar="M",
                   help="a wall-clock budget: stop at the first epoch end at or past M minutes of training "
                        "(the epoch log's `minutes`, continued across --resume); --epochs still caps it")
    p.add_argument("--plot", action="store_true",
                   help="after training, plot the epoch log NAME.csv (test bits/dim against minutes) to NAME.png; "
                        "several runs together: python flow_train.py --plot A.csv B.csv")
    add_scale_out_args(p)


def _say(dest, value):
    return f"--{dest.replace('_', '-')} {value}"


def parse(parser, argv=None, *, model, uses_weights=()):
    """Parses and checks the shared flags, then resolves the model's shape into `args.config`
    ({dest: value} of every shape flag, plus what the record holds besides): an explicit flag, else
    the record in --weights (modes that load weights: --sample-only and the `uses_weights` dests)
    or in the run folder (--resume), else the flag's default. An explicit flag that contradicts the
    record is a one-line error naming each difference. Sets args.model, args.loads_weights."""
    args = parser.parse_args(argv)
    args.model = model
    args.shape_flags = list(getattr(parser, "shape_defaults", {}))
    modes = ["sample_only", *uses_weights]
    args.loads_weights = any(getattr(args, m) for m in modes)
    named = ", ".join("--" + m.replace("_", "-") for m in modes)
    if not args.weights.endswith(".weights.h5"):
        parser.error(f"--weights {args.weights}: the file name must end in .weights.h5 (Keras 3)")
    if os.path.isdir(args.weights):
        parser.error(f"--weights {args.weights}: is a folder")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out}: exists and is not a folder")
    if args.resume and args.loads_weights:
        parser.error(f"--resume continues training; it does not go with {named}")
    if args.loads_weights and not os.path.isfile(args.weights):
        parser.error(f"--weights {args.weights}: no such file (train first; {named} use trained weights)")
    if args.loads_weights:
        record, source, hint = read_config(args.weights), f"--weights {args.weights}", \
            "leave the flags out (they are read from the file) or pass the same values"
    elif args.resume:
        record, source, hint = run_record(args.weights), f"--resume: the run in {run_folder(args.weights)}/", \
            "pass the same flags"
    else:
        record = None
    if record is not None and record.get("model", model) != model:
        raise UserError(f"{source} holds a {record['model']} model, not a {model} one")
    given = {d: getattr(args, d) for d in args.shape_flags}
    if record is not None:
        diff = [f"{_say(d, record[d])} (this run: {_say(d, v)})" for d, v in given.items()
                if v is not None and d in record and record[d] != v]
        if diff:
            raise UserError(f"{source} was trained with {', '.join(diff)}; {hint}")
    args.config = {k: v for k, v in (record or {}).items() if k != "model"}
    for d, v in given.items():
        if v is None:
            v = args.config.get(d, parser.shape_defaults[d])
        setattr(args, d, v)
        args.config[d] = v
    return args


def image_data(args, reads_data, mnist_size=32, folder_size=64):
    """--data and --img-size of the image scripts (Glow, f-VAE, TarFlow): --data is an image folder,
    an mnist.npz file or nothing (MNIST at `mnist_size`); --img-size defaults to `folder_size` for a
    folder. Records the data's channels in args.config (a loaded model's record knows better, and a
    run that `reads_data` must match it). Returns whether --data is a folder."""
    folder = bool(args.data) and os.path.isdir(args.data)
    if args.data and not folder and not os.path.isfile(args.data):
        raise UserError(f"--data {args.data}: no such folder or file")
    if args.data and not folder and not args.data.endswith(".npz"):
        raise UserError(f"--data {args.data}: expected a folder of images or an mnist.npz file")
    if args.img_size is None:
        args.img_size = args.config["img_size"] = folder_size if folder else mnist_size
    elif reads_data and not folder and args.img_size != mnist_size:
        raise UserError(f"--img-size {args.img_size}: MNIST is {mnist_size}×{mnist_size} here; use "
                        f"--img-size {mnist_size} or an image folder with --data")
    channels = 3 if folder else 1
    if not args.loads_weights:
        args.config["channels"] = channels
    elif args.config.setdefault("channels", channels) != channels and reads_data:
        raise UserError(f"--weights {args.weights} holds a model of {args.config['channels']} channel(s); "
                        f"--data {args.data or 'MNIST'} has {channels}")
    return folder


def start(args):
    """The start of every run: the strategy (before any other TensorFlow work), the precision
    policy, the seed, and a writable --out. Returns the strategy."""
    strategy = make_strategy(args.distribute, args.devices)
    # the bfloat16 default is for training; sampling and the experiments keep float32 unless asked
    bf16_default = getattr(args, "bf16_default", False) and not args.loads_weights
    args.mixed_precision, args.precision_why = choose_precision(args.mixed_precision, bf16_default)
    set_mixed_precision(args.mixed_precision)
    if args.seed is not None:
        keras.utils.set_random_seed(args.seed)
    check_writable(args.out, f"--out {args.out}")
    return strategy


def check_training(args):
    """Before the data are read and anything is written: what this run may do with what is on
    disk (an earlier run is never overwritten; --resume needs one with the same architecture,
    derived entries of args.config included) and whether --weights' folder is writable."""
    check_run(args.weights, args.resume, args.epochs)
    if args.resume:
        record = run_record(args.weights) or {}
        diff = [f"{k} {record[k]} (this run: {k} {v})" for k, v in args.config.items()
                if k not in args.shape_flags and k in record and record[k] != v]
        if diff:
            raise UserError(f"--resume: the run in {run_folder(args.weights)}/ was trained with "
                            f"{', '.join(diff)}; pass the same data")
        if args.distribute == "multiworker":
            raise UserError("--resume with --distribute multiworker is not supported: only the chief keeps "
                            "backups, the other workers would start again from epoch 0")
    check_writable(os.path.dirname(args.weights), f"--weights {args.weights}")


def load_weights(model, args):
    """--weights into `model`, built from args.config; a file that does not fit is one line."""
    try:
        with warnings.catch_warnings():  # Keras warns per object before raising; we say it in one line
            warnings.simplefilter("ignore")
            model.load_weights(args.weights)
        return
    except Exception as e:  # noqa: BLE001 - any failure is reported as one line below
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    if read_config(args.weights) is None:
        flags = ", ".join("--" + d.replace("_", "-") for d in args.shape_flags)
        raise UserError(f"--weights {args.weights}: cannot load it into this {args.model} model ({why}); the "
                        f"file holds no architecture record (an older run, or not {args.model}'s): give the "
                        f"flags it was trained with ({flags})")
    raise UserError(f"--weights {args.weights}: cannot load it into this {args.model} model ({why})")


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

    def __init__(self, path, monitor="loss", after_epoch=10, low_lr=1e-5, max_collapses=5, verbose=1,
                 config=None):
        super().__init__()
        self.path, self.monitor, self.after_epoch, self.config = path, monitor, after_epoch, config
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
            save_weights_atomic(self.model, self.path, self.config)
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

    def __init__(self, folder, keep_best=None, interrupt=None, config=None):
        super().__init__()
        self.folder, self.keep_best, self.interrupt, self.config = folder, keep_best, interrupt, config

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
        save_weights_atomic(self.model, os.path.join(self.folder, name), self.config)
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

def run_folder(weights):
    """A training run's backups for --resume live beside its best weights:
    nice.weights.h5 -> nice.run/ (Backup's state.json and the last epoch-NNNN.weights.h5)."""
    return weights[: -len(".weights.h5")] + ".run"


def run_record(weights):
    """The architecture record of the run of `weights`: from its last backup, else None."""
    folder = run_folder(weights)
    state = Backup.read_state(folder)
    return read_config(os.path.join(folder, state["weights"])) if state else None


def check_run(weights, resume, epochs):
    """Before anything is written, what a training run may do with what is on disk; returns the
    run's folder. Without `resume` an earlier run (best weights or backups) is never overwritten;
    with it there must be a completed epoch to resume and fewer than `epochs` epochs done (the
    total, as fit counts). The architecture was checked against the record by `parse`."""
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
    if state["epoch"] >= epochs:
        raise UserError(f"--resume: the run in {folder}/ has completed {state['epoch']} epochs already "
                        f"(--epochs {epochs} is the total); pass a larger --epochs to train it further")
    return folder


def open_run(model, weights, resume, keep_best, interrupt, config):
    """(Backup callback, epochs already done) for a run checked by check_run. Resuming loads the last
    completed epoch's weights, optimizer state, learning rate and best record."""
    backup = Backup(run_folder(weights), keep_best=keep_best, interrupt=interrupt, config=config)
    backup.set_model(model)
    if not resume:
        return backup, 0
    done = backup.restore()
    if not os.path.exists(weights):  # best file deleted: the record would never be beaten to rewrite it
        keep_best.best = math.inf
    return backup, done


# --- speed: the optimizer's update in one pass -------------------------------------------------------

class Adam(keras.optimizers.Adam):
    """Keras' Adam with TensorFlow's fused update kernel (ResourceApplyAdam) for each variable: the
    same formula (m, v, bias-corrected step, ε outside the square root) in one pass over the variable,
    m and v, where Keras' update is five element-wise ops, each a pass through memory. Measured on a
    NICE step (19 M parameters, docs/running.md#performance): Keras' update was about half of the
    step's time without XLA. Elsewhere — another backend, a tf.distribute strategy (whose mirrored
    variables Keras updates replica by replica), amsgrad, sparse gradients — Keras' own update."""

    def update_step(self, gradient, variable, learning_rate):
        import tensorflow as tf

        if (keras.backend.backend() != "tensorflow" or self.amsgrad or tf.distribute.has_strategy()
                or isinstance(gradient, tf.IndexedSlices)):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        i = self._get_variable_index(variable)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=self._momentums[i].handle, v=self._velocities[i].handle,
            beta1_power=tf.pow(tf.cast(self.beta_1, dtype), step), beta2_power=tf.pow(tf.cast(self.beta_2, dtype), step),
            lr=tf.cast(learning_rate, dtype), beta1=tf.cast(self.beta_1, dtype), beta2=tf.cast(self.beta_2, dtype),
            epsilon=tf.cast(self.epsilon, dtype), grad=tf.cast(gradient, dtype))


def build_optimizer(model):
    """Creates the optimizer's slots (Adam's m and v) eagerly, before `fit`. Left to fit, they are
    created inside the first trace, where TensorFlow guards each new variable's initialiser with a
    tf.cond: two conditionals per weight to trace, which was about half of NICE's first step."""
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)


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
                        choices=(*PRECISIONS, "none"),
                        help="coupling networks compute in 16 bits (bfloat16 if no value: CPUs, TPUs, "
                             "Ampere+ GPUs; float16 for older GPUs, with dynamic loss scaling); "
                             "variables, the flow's data path, log-dets and the loss stay float32. "
                             "none: float32 throughout. Default: the script's choice, printed at start "
                             "(NICE and Glow training: mixed bfloat16 on a CPU with bfloat16 instructions, else float32)")


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


BF16_FLAGS = (("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16"))


def cpu_bfloat16(cpuinfo="/proc/cpuinfo"):
    """The bfloat16 instruction sets the CPU lists (Linux /proc/cpuinfo flags), e.g. ["AVX512-BF16",
    "AMX-BF16"]; [] without them or without the file (other systems: float32 stays the default)."""
    try:
        with open(cpuinfo) as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return []
    return [name for flag, name in BF16_FLAGS if flag in flags]


def choose_precision(flag, bf16_default, cpu_bf16=None, gpus=None):
    """(precision for `set_mixed_precision`, why) from --mixed-precision: an explicit value wins ("none"
    is float32); unset, a model whose default is bfloat16 gets it on a CPU-only machine whose CPU has
    bfloat16 instructions (oneDNN runs them at about twice the float32 matmul rate), float32 elsewhere:
    on a GPU 16 bits stays the user's choice. cpu_bf16 and gpus: detected when None (tests force them)."""
    if flag == "none":
        return None, "--mixed-precision none"
    if flag:
        return flag, f"--mixed-precision {flag}"
    if not bf16_default:
        return None, "this model's default; --mixed-precision bfloat16 to try 16 bits"
    if gpus is None:
        import tensorflow as tf
        gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return None, "on a GPU 16 bits is opt-in: --mixed-precision"
    cpu_bf16 = cpu_bfloat16() if cpu_bf16 is None else cpu_bf16
    if cpu_bf16:
        return "bfloat16", f"CPU has {', '.join(cpu_bf16)}; --mixed-precision none for float32"
    return None, "CPU has no bfloat16 instructions"


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


def run_script(parse_args, train, experiments, argv=None):
    """A script's main: parse, `start`, then experiments(args) when the flags load weights, else
    train(args, strategy); returns the exit code (see script_main)."""
    def body():
        args = parse_args(argv)
        strategy = start(args)
        return experiments(args) if args.loads_weights else train(args, strategy)
    return script_main(body)


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


# --- the run ------------------------------------------------------------------------------------

def log_path(weights):
    """Each epoch's figures, one CSV row per epoch, beside the weights: nice.weights.h5 -> nice.csv."""
    return weights[: -len(".weights.h5")] + ".csv"


class Progress(keras.callbacks.Callback):
    """Adds the run's wall-clock `minutes` (continued across --resume) and optimizer `steps` to each
    epoch's logs, so the CSV log gives the likelihood against time and against steps; with a `budget`
    (--minutes) it ends training at the first epoch end at or past it."""

    def __init__(self, minutes=0.0, budget=None):
        super().__init__()
        self.offset, self.budget = minutes, budget

    @staticmethod
    def minutes_so_far(path):
        """The last `minutes` in an earlier run's CSV log, 0 without one."""
        import csv

        try:
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            return float(rows[-1]["minutes"]) if rows else 0.0
        except (OSError, KeyError, ValueError):
            return 0.0

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["minutes"] = self.offset + (time.perf_counter() - self.start) / 60
            logs["steps"] = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            if self.budget is not None and logs["minutes"] >= self.budget:  # --minutes: a whole epoch, then stop
                self.model.stop_training = True
                print(f"--minutes {self.budget:g}: stopping after epoch {epoch + 1}, at {logs['minutes']:.1f} "
                      f"minutes of training", flush=True)


def train(encoder, train_data, val_data=None, *, args, strategy, monitor="val_loss", after_epoch=10,
          callbacks=(), chief_callbacks=(), before_fit=None, finish=None, **fit_kwargs):
    """`encoder.fit` with what a long run needs around it; returns the exit code: 0, 3 when the
    loss stayed non-finite (--max-collapses), 130 after Ctrl-C. The best weights by `monitor` go
    to --weights with the architecture record (KeepBest, which also applies the collapse rule after
    `after_epoch`); every epoch is backed up for --resume; only the chief writes the user's files.
    `before_fit()` runs after a resume restored the weights (Glow's Actnorm init); `finish()` runs
    on the chief after the best weights are reloaded, interrupted or not (the sample grid).
    `callbacks` come first (they may add to the logs KeepBest reads); the rest goes to fit."""
    if getattr(args, "precision_why", None):  # once, as training starts (`start` chose it)
        print(f"precision: {keras.config.dtype_policy().name} ({args.precision_why})", flush=True)
    record = {"model": args.model, **args.config}
    weights = worker_path(args.weights, strategy)  # the chief writes args.weights, other workers a temp copy
    best = KeepBest(weights, monitor=monitor, after_epoch=after_epoch, max_collapses=args.max_collapses,
                    config=record)
    interrupt = Interrupt()  # Ctrl-C: stop after the step, still finish() from the best weights, exit 130
    with strategy.scope():  # a resumed run builds the optimizer's variables
        build_optimizer(encoder)
        backup, done = open_run(encoder, weights, args.resume, best, interrupt, record)
    if args.resume:
        print(f"resuming {run_folder(args.weights)}/ after epoch {done} of {args.epochs} (learning rate "
              f"{float(keras.ops.convert_to_numpy(encoder.optimizer.learning_rate)):.3g}, best {monitor} "
              f"{best.best:.1f})", flush=True)
    if before_fit is not None:
        before_fit()
    chief = is_chief(strategy)
    log = worker_path(log_path(args.weights), strategy)
    os.makedirs(os.path.dirname(os.path.abspath(log)), exist_ok=True)  # CSVLogger opens it at once
    progress = Progress(Progress.minutes_so_far(log) if args.resume else 0.0, getattr(args, "minutes", None))
    encoder.fit(train_data, validation_data=val_data, epochs=args.epochs, initial_epoch=done,
                callbacks=[*callbacks, *(chief_callbacks if chief else ()), progress,
                           keras.callbacks.CSVLogger(log, append=args.resume), best, backup, interrupt],
                **fit_kwargs)
    if best.gave_up:
        print(f"error: training stopped after {best.collapses} non-finite batch losses "
              f"(--max-collapses {args.max_collapses}); the best weights stay in {args.weights}",
              file=sys.stderr, flush=True)
        return 3
    if os.path.isfile(weights):  # the best epoch, as the articles' checkpoints
        encoder.load_weights(weights)
    if finish is not None and chief:
        finish()
    if getattr(args, "plot", False) and chief and os.path.isfile(log):
        png = log[: -len(".csv")] + ".png"
        plot_curves({os.path.basename(log)[: -len(".csv")]: read_curve(log)}, png)
        print(f"wrote {png} (the epoch log {log} against minutes)", flush=True)
    if interrupt.interrupted:
        state = Backup.read_state(run_folder(args.weights)) or {}
        print(f"interrupted: best weights in {args.weights}; continue with --resume (last completed "
              f"epoch: {state.get('epoch', 0)})" if os.path.isfile(args.weights) else
              "interrupted before any epoch ended: no weights kept, the pictures are from the current ones",
              flush=True)
        return 130
    return 0


# --- likelihood against time: the epoch logs plotted -----------------------------------------------

CURVE_KEYS = (("val_bpd", "test bits/dim"), ("bpd", "training bits/dim"), ("val_loss", "test loss (nats)"))


def read_curve(path):
    """(label of the figure, [(minutes, figure, steps)]) from an epoch log NAME.csv: test bits/dim when
    the run logged them, else training bits/dim, else the test loss."""
    import csv

    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise UserError(f"--plot {path}: cannot read it ({e.strerror or type(e).__name__})") from None
    if not rows or "minutes" not in rows[0]:
        raise UserError(f"--plot {path}: not an epoch log (no rows with a `minutes` column)")
    for key, label in CURVE_KEYS:
        if key in rows[0]:
            return label, [(float(r["minutes"]), float(r[key]), int(float(r.get("steps") or 0))) for r in rows]
    raise UserError(f"--plot {path}: no column among {', '.join(k for k, _ in CURVE_KEYS)}")


def curve_table(curves, marks):
    """Markdown: per run, the best figure reached by each time mark (minutes)."""
    lines = ["| minutes | " + " | ".join(curves) + " |", "|---|" + "---|" * len(curves)]
    for m in marks:
        cells = []
        for _, rows in curves.values():
            seen = [y for t, y, _ in rows if t <= m]
            cells.append(f"{min(seen):.3f}" if seen else "–")
        lines.append(f"| {m:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(curves, path, xlabel="wall-clock minutes", title=None, ymax=None):
    """{name: (figure label, rows)} -> one PNG, each run's figure against minutes (written atomically);
    `ymax` cuts the axis there (a one-epoch spike would otherwise flatten every curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for name, (_, rows) in curves.items():
        ax.plot([r[0] for r in rows], [r[1] for r in rows], marker="o", ms=2.5, lw=1.2, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(" / ".join(dict.fromkeys(label for label, _ in curves.values())))
    if title:
        ax.set_title(title, fontsize=9)
    if ymax is not None:
        ax.set_ylim(top=ymax)
    if curves:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def plot_main(argv=None):
    """python flow_train.py --plot A.csv [B.csv ...]: several runs' epoch logs in one PNG and a table."""
    p = ArgumentParser(description="Plot epoch logs (NAME.csv beside NAME.weights.h5): test bits/dim "
                                   "against wall-clock minutes, several runs in one picture.")
    p.add_argument("--plot", nargs="+", required=True, metavar="CSV", help="the runs' epoch logs")
    p.add_argument("--labels", help="comma-separated names for the runs (default: the file names)")
    p.add_argument("--png", default="curves.png", help="the picture to write (default: curves.png)")
    p.add_argument("--title", help="a title for the picture")
    p.add_argument("--ymax", type=float, help="top of the y axis (points above it are cut off)")
    p.add_argument("--marks", type=positive(float), nargs="*", metavar="MIN",
                   help="time marks of the printed table (default: every whole minute, at most 20)")

    def body():
        args = p.parse_args(argv)
        names = args.labels.split(",") if args.labels else [os.path.basename(c)[: -len(".csv")]
                                                             if c.endswith(".csv") else c for c in args.plot]
        if len(names) != len(args.plot):
            raise UserError(f"--labels: {len(names)} names for {len(args.plot)} logs")
        curves = dict(zip(names, (read_curve(c) for c in args.plot)))
        last = max(rows[-1][0] for _, rows in curves.values())
        marks = args.marks or sorted({max(1, round(last * i / 20)) for i in range(1, 21)} if last > 20
                                     else range(1, max(1, math.ceil(last)) + 1))
        print(curve_table(curves, marks))
        plot_curves(curves, args.png, title=args.title, ymax=args.ymax)
        print(f"wrote {args.png}")
        return 0
    return script_main(body)


if __name__ == "__main__":
    sys.exit(plot_main())
