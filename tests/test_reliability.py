"""flowkit.run's training guards on a small real model: NaN batches, Ctrl-C, backups for --resume, and the
Run a script hands to fit."""
import csv
import math
import os
import signal
import sys

import keras
import numpy as np
import pytest

from flowkit import backend
from flowkit.devices import make_strategy
from flowkit.files import atomic_write, read_config
from flowkit.run import Backup, Interrupt, KeepBest, Run, RunSettings


def _model(lr=1e-2):
    keras.utils.set_random_seed(1)
    inp = keras.Input((4,))
    m = keras.Model(inp, keras.layers.Dense(4)(keras.layers.Dense(8, activation="relu")(inp)))
    m.compile(optimizer=keras.optimizers.Adam(lr), loss="mse")
    return m


class _Batches(keras.utils.PyDataset):
    """Batches of 8 (x, x), in order: what fit reads on every backend."""

    def __init__(self, x):
        super().__init__()
        self.x = x

    def __len__(self):
        return len(self.x) // 8

    def __getitem__(self, i):
        return self.x[8 * i:8 * i + 8], self.x[8 * i:8 * i + 8]


def _data(n_batches=6, poison=()):
    x = np.random.RandomState(0).randn(n_batches * 8, 4).astype("float32")
    for b in poison:
        x[b * 8] = np.nan  # one poisoned example makes the whole batch's loss NaN
    return _Batches(x)


def _finite(model):
    return all(np.all(np.isfinite(w)) for w in model.get_weights())


def test_nan_batch_reloads_best_weights_and_lowers_the_rate(tmp_path):
    m = _model()
    best = KeepBest(str(tmp_path / "b.weights.h5"), after_epoch=100, low_lr=1e-4, verbose=0)
    m.fit(_data(), epochs=1, verbose=0, shuffle=False, callbacks=[best])
    assert best.collapses == 0 and os.path.exists(best.path)
    hist = m.fit(_data(poison=[3]), epochs=2, verbose=0, shuffle=False, callbacks=[best])
    assert best.collapses == 2  # the poisoned batch, once per epoch
    assert _finite(m)  # training went on from the reloaded weights, not from NaN
    assert float(m.optimizer.learning_rate) == pytest.approx(1e-4)
    assert all(math.isfinite(v) for v in hist.history["loss"])
    assert not best.gave_up


def test_nan_before_any_best_goes_back_to_the_initial_weights(tmp_path):
    m = _model()
    start = m.get_weights()
    best = KeepBest(str(tmp_path / "b.weights.h5"), verbose=0)
    m.fit(_data(n_batches=1, poison=[0]), epochs=1, verbose=0, shuffle=False, callbacks=[best])
    assert best.collapses == 1 and not os.path.exists(best.path)
    for a, b in zip(m.get_weights(), start):
        np.testing.assert_array_equal(a, b)


def test_repeated_nan_gives_up_and_keeps_the_best_file(tmp_path):
    m = _model()
    best = KeepBest(str(tmp_path / "b.weights.h5"), max_collapses=3, verbose=0)
    m.fit(_data(), epochs=1, verbose=0, shuffle=False, callbacks=[best])
    saved = open(best.path, "rb").read()
    m.fit(_data(n_batches=10, poison=range(10)), epochs=5, verbose=0, shuffle=False, callbacks=[best])
    assert best.gave_up and best.collapses == 3
    assert m.optimizer.iterations.numpy() < 6 + 10  # stopped inside the first poisoned epoch
    assert open(best.path, "rb").read() == saved


def test_collapse_rule_positive_loss_only_after_the_given_epoch(tmp_path):
    m = _model()
    best = KeepBest(str(tmp_path / "b.weights.h5"), after_epoch=10, low_lr=1e-5, verbose=0)
    best.set_model(m)
    best.on_train_begin()
    best.on_epoch_end(0, {"loss": -5.0})
    best.on_epoch_end(4, {"loss": 3.0})  # positive, but before epoch 10: not a collapse
    assert best.collapses == 0
    w = [v.copy() for v in m.get_weights()]
    m.layers[1].kernel.assign(m.layers[1].kernel + 1.0)
    best.on_epoch_end(11, {"loss": 3.0})
    assert best.collapses == 1 and float(m.optimizer.learning_rate) == pytest.approx(1e-5)
    np.testing.assert_array_equal(m.get_weights()[0], w[0])
    best.on_epoch_end(2, {"loss": float("nan")})  # NaN collapses at any epoch
    assert best.collapses == 2


class _CtrlC(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if batch == 2:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_stops_after_the_step_and_the_epoch_is_not_backed_up(tmp_path):
    m = _model()
    stop = Interrupt()
    backup = Backup(str(tmp_path / "backup"), interrupt=stop)
    m.fit(_data(), epochs=1, verbose=0, shuffle=False, callbacks=[backup])  # one complete epoch: 6 steps
    before = signal.getsignal(signal.SIGINT)
    m.fit(_data(), epochs=3, verbose=0, shuffle=False, callbacks=[_CtrlC(), stop, backup])
    assert stop.interrupted
    assert int(m.optimizer.iterations.numpy()) == 6 + 3  # stopped right after the third step
    assert Backup.read_state(backup.folder)["epoch"] == 1  # the cut epoch is not recorded
    assert signal.getsignal(signal.SIGINT) is before  # a second Ctrl-C acts as usual


def test_backup_restores_weights_optimizer_epoch_and_best(tmp_path):
    folder = str(tmp_path / "backup")
    m = _model()
    best = KeepBest(str(tmp_path / "b.weights.h5"), verbose=0)
    m.fit(_data(), epochs=3, verbose=0, shuffle=False, callbacks=[best, Backup(folder, keep_best=best)])
    assert sorted(os.listdir(folder)) == ["epoch-0003.weights.h5", "state.json"]

    fresh = _model(lr=5.0)  # other initial weights and rate: restore must replace all of them
    best2 = KeepBest(str(tmp_path / "b.weights.h5"), verbose=0)
    backup2 = Backup(folder, keep_best=best2)
    backup2.set_model(fresh)
    assert backup2.restore() == 3
    for a, b in zip(fresh.get_weights(), m.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert int(fresh.optimizer.iterations.numpy()) == 18
    assert float(fresh.optimizer.learning_rate) == pytest.approx(1e-2)
    for a, b in zip(fresh.optimizer.variables, m.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert best2.best == best.best and math.isfinite(best2.best)


def test_backup_copies_the_file_keep_best_just_wrote(tmp_path, monkeypatch):
    """An epoch that improved: the backup is KeepBest's file, byte for byte, not a second serialisation;
    an epoch that did not: the backup holds that epoch's own weights."""
    folder, path = str(tmp_path / "backup"), str(tmp_path / "b.weights.h5")
    m = _model()
    best = KeepBest(path, verbose=0, config={"width": 8})
    backup = Backup(folder, keep_best=best, config={"width": 8})
    saves = []
    monkeypatch.setattr(m, "save_weights", lambda p, *a, **k: saves.append(p) or keras.Model.save_weights(m, p, *a, **k))
    m.fit(_data(), epochs=1, verbose=0, shuffle=False, callbacks=[best, backup])
    assert len(saves) == 1  # KeepBest's only
    with open(path, "rb") as a, open(os.path.join(folder, "epoch-0001.weights.h5"), "rb") as b:
        assert a.read() == b.read()
    best.best = -math.inf  # nothing improves now: the backup must save the model itself
    m.fit(_data(), epochs=2, initial_epoch=1, verbose=0, shuffle=False, callbacks=[best, backup])
    assert len(saves) == 2 and best.best_epoch == 1
    fresh = _model(lr=5.0)
    backup2 = Backup(folder)
    backup2.set_model(fresh)
    assert backup2.restore() == 2 and read_config(os.path.join(folder, "epoch-0002.weights.h5")) == {"width": 8}
    for a, b in zip(fresh.get_weights(), m.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_backup_state_points_at_a_complete_file_when_a_write_is_torn(tmp_path):
    folder = str(tmp_path / "backup")
    m = _model()
    m.fit(_data(), epochs=1, verbose=0, shuffle=False, callbacks=[Backup(folder)])

    def killed(tmp):
        open(tmp, "w").write("{half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(os.path.join(folder, Backup.STATE), killed)
    state = Backup.read_state(folder)
    assert state["epoch"] == 1 and os.path.isfile(os.path.join(folder, state["weights"]))
    assert Backup(str(tmp_path / "nothing")).read_state(str(tmp_path / "nothing")) is None


# --- Run: what a script hands to fit ------------------------------------------------------------

def _run_args(tmp_path, **more):
    """What flow_cli.run_settings gives a training run, for the tiny model."""
    args = dict(record={"model": "tiny", "width": 8}, weights=str(tmp_path / "t.weights.h5"), epochs=2,
                max_collapses=2)
    return RunSettings(**{**args, **more})


def _fit(m, run, data=None, epochs=2):
    return m.fit(data or _data(), validation_data=_data(2), epochs=epochs, initial_epoch=run.initial_epoch,
                 callbacks=run.callbacks, shuffle=False, verbose=0)


def test_run_around_fit_keeps_the_best_weights_the_log_and_backups(tmp_path, capsys):
    m = _model()
    run = Run(m, _run_args(tmp_path, precision_why="a test"), make_strategy())
    assert run.initial_epoch == 0 and not run.resumed and m.optimizer.built  # the slots exist before fit
    _fit(m, run)
    pictures = []
    assert run.end(pictures=lambda: pictures.append("grid")) == 0 and pictures == ["grid"]
    out = capsys.readouterr().out
    # the backend and its devices, then the precision: the run's first two lines
    assert out.startswith(f"backend: {keras.backend.backend()} (")
    assert out.splitlines()[:2] == [backend.describe(), "precision: float32 (a test)"]
    lines = [line for line in out.splitlines() if line.startswith("first step: ")]
    assert len(lines) == 1 and lines[0].endswith(" s (tracing included)")  # once per fit, not per epoch
    assert read_config(str(tmp_path / "t.weights.h5")) == {"model": "tiny", "width": 8}
    with open(tmp_path / "t.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1"] and float(rows[-1]["minutes"]) > 0 and rows[-1]["steps"] == "12"
    assert Backup.read_state(str(tmp_path / "t.run"))["epoch"] == 2


def test_run_resumes_after_the_last_epoch(tmp_path, capsys):
    m = _model()
    run = Run(m, _run_args(tmp_path), make_strategy())
    _fit(m, run)
    run.end()
    m2 = _model(lr=5.0)
    run2 = Run(m2, _run_args(tmp_path, resume=True, epochs=3), make_strategy())
    assert run2.resumed and run2.initial_epoch == 2 and int(m2.optimizer.iterations.numpy()) == 12
    assert f"resuming {tmp_path / 't.run'}/ after epoch 2 of 3" in capsys.readouterr().out
    history = _fit(m2, run2, epochs=3)
    assert len(history.history["loss"]) == 1 and run2.end() == 0


def test_run_gives_up_with_code_3_and_no_pictures(tmp_path, capsys):
    m = _model()
    run = Run(m, _run_args(tmp_path), make_strategy())
    _fit(m, run, _data(n_batches=4, poison=range(4)))
    pictures = []
    assert run.end(pictures=lambda: pictures.append("grid")) == 3 and pictures == []
    assert capsys.readouterr().err.strip() == (f"error: training stopped after 2 non-finite batch losses "
                                               f"(--max-collapses 2); the best weights stay in {run.weights}")


def test_run_after_ctrl_c_reloads_the_best_weights_with_code_130(tmp_path, capsys):
    m = _model()
    run = Run(m, _run_args(tmp_path, epochs=3), make_strategy())
    m.fit(_data(), epochs=3, callbacks=[_CtrlC(), *run.callbacks], shuffle=False, verbose=0)  # in epoch 1
    pictures = []
    assert run.end(pictures=lambda: pictures.append(print("grid"))) == 130
    assert pictures  # the pictures are still written, from the current weights, after the line that says so
    assert capsys.readouterr().out.endswith("interrupted before any epoch ended: no weights kept, the pictures "
                                            "are from the current ones\ngrid\n")


def test_run_verbose_and_chief_only(tmp_path, monkeypatch):
    m = _model()
    run = Run(m, _run_args(tmp_path), make_strategy())
    assert run.verbose == 2 and run.chief_only("a", "b") == ["a", "b"]  # one process: the chief
    assert Run(_model(), _run_args(tmp_path), make_strategy(), prints_epochs=True).verbose == 0
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert Run(_model(), _run_args(tmp_path), make_strategy(), prints_epochs=True).verbose == 1  # the bar


# --- the collapse rule: Glow's alone, and a resumed run keeps the one it started with ---------------

def test_run_has_no_collapse_rule_unless_asked_and_a_resumed_run_keeps_its_own(tmp_path):
    m = _model()
    best = Run(m, _run_args(tmp_path), make_strategy()).keep_best
    assert best.after_epoch is None
    best.set_model(m)
    best.on_train_begin()
    best.on_epoch_end(0, {"val_loss": -5.0})
    best.on_epoch_end(11, {"val_loss": 3.0})  # positive after epoch 10: without the rule, just a worse epoch
    assert best.collapses == 0 and best.best == -5.0
    m = _model()
    run = Run(m, _run_args(tmp_path, weights=str(tmp_path / "g.weights.h5")), make_strategy(), collapse_after=10)
    _fit(m, run)
    assert run.end() == 0 and Backup.read_state(str(tmp_path / "g.run"))["collapse_after"] == 10
    resumed = Run(_model(), _run_args(tmp_path, weights=str(tmp_path / "g.weights.h5"), resume=True, epochs=3),
                  make_strategy())  # asks for no rule: the run's own record wins
    assert resumed.keep_best.after_epoch == 10


@pytest.fixture
def built_runs(monkeypatch):
    """Every flowkit.run.Run that nice.py and glow.py build, to look at after their main returns."""
    import glow
    import nice

    runs = []

    class Kept(Run):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            runs.append(self)

    for script in (nice, glow):
        monkeypatch.setattr(script, "Run", Kept)
    return runs


def test_nice_trains_without_the_collapse_rule(tmp_path, digits, built_runs):
    import nice
    from helpers import mnist_npz

    npz = mnist_npz(tmp_path / "mnist.npz", digits, 100, 50)
    assert nice.main(["--data", npz, "--epochs", "1", "--batch-size", "50", "--hidden", "8", "--hidden-layers", "1",
                      "--couplings", "2", "--weights", str(tmp_path / "n.weights.h5"), "--out", str(tmp_path)]) == 0
    (run,) = built_runs
    assert run.keep_best.monitor == "val_loss" and run.keep_best.after_epoch is None  # the article's checkpoint
    assert Backup.read_state(str(tmp_path / "n.run"))["collapse_after"] is None


def test_glow_trains_with_its_collapse_rule_and_keeps_it_on_resume(tmp_path, digits, built_runs, monkeypatch):
    import glow
    from helpers import mnist_npz

    npz = mnist_npz(tmp_path / "mnist.npz", digits, 100, 50)
    argv = ["--data", npz, "--level", "1", "--depth", "1", "--hidden", "4", "--batch-size", "8",
            "--steps-per-epoch", "2", "--weights", str(tmp_path / "g.weights.h5"), "--out", str(tmp_path)]
    assert glow.main([*argv, "--epochs", "1"]) == 0
    assert built_runs[0].keep_best.monitor == "loss"
    assert built_runs[0].keep_best.after_epoch == glow.COLLAPSE_AFTER_EPOCH == 10
    assert built_runs[0].keep_best.low_lr == glow.COLLAPSE_LR
    monkeypatch.setattr(glow, "COLLAPSE_AFTER_EPOCH", 30)  # were the script's rule to change mid-run
    assert glow.main([*argv, "--epochs", "2", "--resume"]) == 0
    assert built_runs[1].resumed and built_runs[1].keep_best.after_epoch == 10  # the run's own rule
    state = Backup.read_state(str(tmp_path / "g.run"))
    assert state["epoch"] == 2 and state["collapse_after"] == 10
