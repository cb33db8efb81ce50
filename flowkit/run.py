"""What a long training run needs around `fit`, as callbacks and one object, `Run`, that a script hands
to fit: the best weights (with the architecture record) and a script's collapse rule, Ctrl-C, per-epoch
backups and --resume, the CSV epoch log with wall-clock minutes (--minutes, --plot), the optimizer.
`RunSettings` is what a run takes from the command line (flowkit.cli.run_settings builds it).
"""
import csv
import dataclasses
import json
import math
import os
import shutil
import signal
import statistics
import sys
import time
import warnings

import keras
import numpy as np

from flowkit import backend
from flowkit.curves import plot_log
from flowkit.density import prior_constant
from flowkit.devices import is_chief, worker_path
from flowkit.files import UserError, atomic_write, read_config, save_weights_atomic


def _reload(model, path):
    """model.load_weights(path) of the run's own best weights. A weights-only file (`Run.end` writes one)
    leaves the optimizer's state as it is, which Keras announces with a warning for every such load:
    expected here, so not shown. (A user's --weights: flowkit.cli.load_weights.)"""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(path)


class KeepBest(keras.callbacks.Callback):
    """Keeps the best weights by `monitor` (written atomically). A collapse reloads the best weights and
    sets the learning rate to `low_lr`. With `after_epoch` it applies the Glow article's collapse rule:
    a loss that turns positive after that epoch is a collapse (None, the default: no such rule, for a
    loss that may be positive). A loss that is not finite is a collapse at any time, with or without
    the rule (the original's `loss > 0` never fires on NaN): checked after every batch too, so
    training never goes on from garbage; the reload also restores the optimizer's moments, which a NaN
    gradient poisons (Keras' .weights.h5 holds the optimizer state). After `max_collapses` non-finite
    losses training stops and `gave_up` is set; the best weights stay on disk.
    """

    def __init__(self, path, monitor="loss", after_epoch=None, low_lr=1e-5, max_collapses=5, verbose=1,
                 config=None):
        super().__init__()
        self.path, self.monitor, self.after_epoch, self.config = path, monitor, after_epoch, config
        self.low_lr, self.max_collapses, self.verbose = low_lr, max_collapses, verbose
        self.best = math.inf
        self.best_epoch = None  # the epoch (counted from 1) whose weights are in `path`
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
            _reload(self.model, self.path)
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
            self.best, self.best_epoch = value, epoch + 1
            save_weights_atomic(self.model, self.path, self.config)
            self._say(f"\nepoch {epoch + 1}: {self.monitor} improved to {value:.4f}, saved {self.path}")
        elif not math.isfinite(value) or (self.after_epoch is not None and epoch + 1 > self.after_epoch
                                              and value > 0):
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
    state.json naming that file with the epoch count and KeepBest's record (its collapse rule too,
    which a resumed run keeps). Each file is written atomically and state.json last, so a kill at any
    instant leaves a consistent pair; Keras' BackupAndRestore writes its files in place. An epoch cut
    short by Ctrl-C is not recorded.
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
        best = self.keep_best
        if best is not None and best.best_epoch == epoch + 1 and best.config == self.config:
            # KeepBest has just written these very bytes (weights, optimizer state, record): copying them
            # costs milliseconds, serialising the model again most of a second (Keras walks every layer)
            atomic_write(os.path.join(self.folder, name), lambda tmp: shutil.copyfile(best.path, tmp))
        else:
            save_weights_atomic(self.model, os.path.join(self.folder, name), self.config)
        state = {"epoch": epoch + 1, "weights": name}
        if self.keep_best is not None:
            state.update(best=self.keep_best.best, collapses=self.keep_best.collapses,
                         best_epoch=self.keep_best.best_epoch, collapse_after=self.keep_best.after_epoch)
        atomic_write(os.path.join(self.folder, self.STATE),
                     lambda tmp: open(tmp, "w").write(json.dumps(state, indent=1)))
        for old in os.listdir(self.folder):
            if old.startswith("epoch-") and old.endswith(".weights.h5") and old != name:
                os.remove(os.path.join(self.folder, old))

    def restore(self):
        """Loads the last completed epoch's weights, optimizer state and best record, with the collapse
        rule the run started with (a state written before the rule was recorded: the one asked now);
        returns the number of epochs already done (fit's initial_epoch), 0 when there is nothing to resume."""
        state = self.read_state(self.folder)
        if state is None:
            return 0
        if not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(os.path.join(self.folder, state["weights"]))
        if self.keep_best is not None:
            self.keep_best.best = state.get("best", math.inf)
            self.keep_best.collapses = state.get("collapses", 0)
            self.keep_best.best_epoch = state.get("best_epoch")
            self.keep_best.after_epoch = state.get("collapse_after", self.keep_best.after_epoch)
        return int(state["epoch"])


# --- runs: --resume ----------------------------------------------------------------------------

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
    total, as fit counts). The architecture was checked against the record by flowkit.cli.parse."""
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


# --- the epoch log ------------------------------------------------------------------------------

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


class FirstStep(keras.callbacks.Callback):
    """One line when the first training step of `fit` is done: the seconds since fit began, which on
    a CPU are mostly tracing the step (and XLA's compile); the later steps are far quicker."""

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if self.start is not None:
            print(f"first step: {time.perf_counter() - self.start:.1f} s (tracing included)", flush=True)
            self.start = None


class EpochLine(keras.callbacks.Callback):
    """One line of figures per epoch with its seconds (training and validation), for a script that
    prints its own (`Run(..., prints_epochs=True)`); at the end, the mean seconds of an epoch."""

    def __init__(self, dims):
        super().__init__()
        self.const, self.seconds = prior_constant(dims), []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()
        self.first = epoch + 1 - len(self.seconds)  # this process's first epoch (after a --resume: later)

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.start)
        logs = logs or {}
        loss = logs.get("loss", math.nan)
        print(f"epoch {epoch + 1}: {self.seconds[-1]:.1f} s, train loss {loss:.1f} nats ({loss - self.const:.1f} "
              f"without the constant), test NLL {logs.get('val_loss', math.nan):.1f} nats, test bits/dim "
              f"{logs.get('val_bpd', math.nan):.3f}", flush=True)

    def on_train_end(self, logs=None):
        if len(self.seconds) > 1:
            first, last = self.first, self.first + len(self.seconds) - 1
            print(f"seconds per epoch: {statistics.mean(self.seconds[1:]):.1f} (mean of epochs {first + 1}-{last}; "
                  f"epoch {first} with tracing: {self.seconds[0]:.1f})", flush=True)


class WarmupCosine(keras.callbacks.Callback):
    """TarFlow's official schedule: linear warm-up over `warmup` steps to `peak`, then a cosine down to
    0 at `total` steps, set before every batch from the optimizer's step count (so --resume continues
    it). A rate changed from outside (KeepBest's collapse rule) becomes the new peak."""

    def __init__(self, peak, total, warmup):
        super().__init__()
        self.peak, self.total, self.warmup, self.last = peak, max(total, 1), warmup, None

    def on_train_batch_begin(self, batch, logs=None):
        lr = self.model.optimizer.learning_rate
        now = float(keras.ops.convert_to_numpy(lr))
        if self.last is not None and abs(now - self.last) > 1e-12:
            self.peak = now  # set by someone else: keep to it
        t = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        scale = (t + 1) / self.warmup if t < self.warmup else \
            0.5 * (1 + np.cos(np.pi * min(1.0, (t - self.warmup) / max(1, self.total - self.warmup))))
        self.last = float(np.float32(self.peak * scale))
        lr.assign(self.last)


# --- speed: the optimizer's slots before fit ---------------------------------------------------------

def build_optimizer(model):
    """Creates the optimizer's slots (Adam's m and v) eagerly, before `fit`. Left to fit, they are
    created inside the first trace, where TensorFlow guards each new variable's initialiser with a
    tf.cond: two conditionals per weight to trace, which was about half of NICE's first step."""
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)


# --- the run: what a script hands to fit -----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What a training run takes from the command line (flowkit.cli.run_settings builds it from the flags):
    `weights` (--weights: the best weights; the run folder, backups and epoch log beside them), `record`
    (the architecture record, {"model": NAME, **config}), `epochs` (the total, with --resume), `resume`,
    `max_collapses`, `minutes` (--minutes), `plot` (--plot), `xla` (compile the step with XLA) and
    `precision_why` (flowkit.cli.start's reason for the precision; None: no backend and precision lines)."""
    weights: str
    record: dict
    epochs: int
    resume: bool = False
    max_collapses: int = 5
    minutes: float | None = None
    plot: bool = False
    xla: bool = False
    precision_why: str | None = None


class Run:
    """A training run around the script's own `model.fit`:

        run = Run(encoder, cli.run_settings(args), strategy, monitor="val_loss")
        encoder.fit(data, validation_data=test, epochs=args.epochs, initial_epoch=run.initial_epoch,
                    callbacks=[BitsPerDim(...), *run.chief_only(Samples(...)), *run.callbacks],
                    verbose=run.verbose)
        code = run.end(pictures=lambda: write_grid(decoder, args))
        if code:
            return code

    Make it after compile, outside the strategy's scope (it enters it itself): it prints the backend
    line (`backend: NAME (DEVICES)`) and the precision line, creates the optimizer's slots, and with
    --resume restores the last completed epoch (weights, optimizer state, learning rate, best figure,
    collapse rule; `resumed`, `initial_epoch`). `callbacks` (after the script's own, which may add to
    the logs they read): the epoch log beside --weights with wall-clock minutes (--minutes stops
    there), the first step's time, KeepBest on `monitor` into --weights, the backups for --resume,
    Ctrl-C. A non-finite loss always reloads the best weights and sets the learning rate to `low_lr`;
    `collapse_after` adds Glow's rule, a positive loss after that epoch is a collapse too (None, the
    default: no such rule; a resumed run keeps the rule it started with). Only the chief writes the
    user's files; the other workers write temporary copies. `verbose` for fit: Keras' progress bar on
    a terminal, else one line per epoch, none when the script `prints_epochs` itself.
    """

    def __init__(self, model, settings, strategy, *, monitor="val_loss", collapse_after=None, low_lr=1e-5,
                 prints_epochs=False):
        if settings.precision_why:
            print(backend.describe(), flush=True)
            print(f"precision: {keras.config.dtype_policy().name} ({settings.precision_why})", flush=True)
        if settings.xla:
            model.jit_compile = True  # --xla: the train step compiles with XLA (Keras resets its functions)
        self.model, self.settings, self.weights = model, settings, settings.weights
        self.chief, self.resumed = is_chief(strategy), settings.resume
        self.path = worker_path(settings.weights, strategy)  # the chief writes --weights, other workers a copy
        self.keep_best = KeepBest(self.path, monitor=monitor, after_epoch=collapse_after, low_lr=low_lr,
                                  max_collapses=settings.max_collapses, config=settings.record)
        self.interrupt = Interrupt()
        with strategy.scope():  # a resumed run builds the optimizer's variables
            build_optimizer(model)
            self.backup, self.initial_epoch = open_run(model, self.path, settings.resume, self.keep_best,
                                                       self.interrupt, settings.record)
        if self.resumed:
            lr = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
            print(f"resuming {run_folder(settings.weights)}/ after epoch {self.initial_epoch} of {settings.epochs} "
                  f"(learning rate {lr:.3g}, best {monitor} {self.keep_best.best:.1f})", flush=True)
        self.log = worker_path(log_path(settings.weights), strategy)
        os.makedirs(os.path.dirname(os.path.abspath(self.log)), exist_ok=True)  # CSVLogger opens it at once
        progress = Progress(Progress.minutes_so_far(self.log) if self.resumed else 0.0, settings.minutes)
        self.callbacks = [progress, FirstStep(), keras.callbacks.CSVLogger(self.log, append=self.resumed),
                          self.keep_best, self.backup, self.interrupt]
        self.verbose = 1 if sys.stdout.isatty() else 0 if prints_epochs else 2

    def chief_only(self, *callbacks):
        """The callbacks on the chief, none on the other workers (per-epoch pictures)."""
        return list(callbacks) if self.chief else []

    def end(self, pictures=None):
        """After fit: reloads the best weights, as the articles' checkpoints; with --plot draws the epoch
        log; then `pictures()` (the script's final pictures) on the chief, unless training gave up.
        Returns the exit code, having said why when it is not 0: 3 when the loss stayed non-finite
        (--max-collapses), 130 after Ctrl-C (the pictures are written all the same)."""
        if self.keep_best.gave_up:
            print(f"error: training stopped after {self.keep_best.collapses} non-finite batch losses "
                  f"(--max-collapses {self.settings.max_collapses}); the best weights stay in {self.weights}",
                  file=sys.stderr, flush=True)
            return 3
        if os.path.isfile(self.path):
            _reload(self.model, self.path)
            if self.chief:  # the optimizer's state stays in the backups for --resume; the weights file is the model
                save_weights_atomic(self.model, self.path, self.keep_best.config, optimizer=False)
        if self.settings.plot and self.chief and os.path.isfile(self.log):
            print(f"wrote {plot_log(self.log)} (the epoch log {self.log} against minutes)", flush=True)
        code = 0
        if self.interrupt.interrupted:
            state = Backup.read_state(run_folder(self.weights)) or {}
            print(f"interrupted: best weights in {self.weights}; continue with --resume (last completed "
                  f"epoch: {state.get('epoch', 0)})" if os.path.isfile(self.weights) else
                  "interrupted before any epoch ended: no weights kept, the pictures are from the current ones",
                  flush=True)
            code = 130
        if pictures is not None and self.chief:
            pictures()
        return code
