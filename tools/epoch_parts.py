"""Where a training run's epochs go: runs one of the scripts as a user runs it, and after each epoch
prints one line: its training steps after the first two (seconds, ms a step, and the cores they kept
busy: CPU time ÷ wall time), its validation, and each epoch-end callback (the epoch grid, the best
weights' save, ...). Keras' progress bar prints its ms/step after all of these, so the figure it shows
(and any comparison that reads it) counts them too.

    python -m tools.epoch_parts tarflow.py --conditional --width 64 --blocks 4 --layers 2 --heads 4 --epochs 3
"""
import os
import resource
import runpy
import sys
import time

import flowkit  # noqa: F401  (TensorFlow, where it runs, starts quietly)
import keras

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("nice.py", "glow.py", "fvae.py", "iresnet.py", "tarflow.py")


def clock():
    """(wall seconds, CPU seconds of this process: user + system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), usage.ru_utime + usage.ru_stime


class EpochParts(keras.callbacks.Callback):
    """Times an epoch's parts; `fit` gets it first, its callbacks timed one by one (`timed`)."""

    def __init__(self):
        super().__init__()
        self.marks, self.parts = {}, []

    def on_epoch_begin(self, epoch, logs=None):
        self.marks, self.parts = {}, []

    def on_train_batch_end(self, batch, logs=None):
        self.marks["last step"] = clock()
        if batch == 1:
            self.marks["second step"] = self.marks["last step"]

    def on_epoch_end(self, epoch, logs=None):  # first of the callbacks: validation is done
        self.marks["validated"] = clock()

    def timed(self, callback):
        """Wraps a callback's on_epoch_end so that its seconds join the epoch's line."""
        inner = callback.on_epoch_end

        def on_epoch_end(epoch, logs=None):
            start = time.perf_counter()
            inner(epoch, logs)
            self.parts.append(f"{type(callback).__name__} {time.perf_counter() - start:.2f} s")
        callback.on_epoch_end = on_epoch_end

    def line(self, epoch):
        (w0, c0), (w1, c1) = self.marks.get("second step", (0, 0)), self.marks.get("last step", (0, 0))
        steps = max(self.params.get("steps") or 0, 1) - 2
        validation = self.marks["validated"][0] - w1
        head = f"epoch {epoch + 1}: "
        if steps > 0 and w1 > w0:
            head += (f"steps 3..{steps + 2} {w1 - w0:.2f} s ({1000 * (w1 - w0) / steps:.0f} ms a step, "
                     f"{(c1 - c0) / (w1 - w0):.2f} cores); ")
        return head + f"validation {validation:.2f} s; " + ", ".join(self.parts)


class Last(keras.callbacks.Callback):
    def __init__(self, parts):
        super().__init__()
        self.epoch_parts = parts

    def on_epoch_end(self, epoch, logs=None):
        print(self.epoch_parts.line(epoch), flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or os.path.basename(argv[0]) not in SCRIPTS:
        print(f"usage: python -m tools.epoch_parts SCRIPT [its flags], SCRIPT one of {', '.join(SCRIPTS)}",
              file=sys.stderr)
        return 2
    fit = keras.Model.fit

    def timed_fit(model, *args, callbacks=None, **kwargs):
        parts, given = EpochParts(), list(callbacks or [])
        for callback in given:
            parts.timed(callback)
        return fit(model, *args, callbacks=[parts, *given, Last(parts)], **kwargs)

    keras.Model.fit = timed_fit
    sys.argv = [os.path.join(ROOT, os.path.basename(argv[0])), *argv[1:]]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        keras.Model.fit = fit
    return 0


if __name__ == "__main__":
    sys.exit(main())
