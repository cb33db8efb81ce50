"""Every bad input of issue 6, for nice.py and glow.py alike: one line `error: ...` on stderr, exit
code 2, and no file created, changed or removed (the folder holds an earlier run, a sample grid and
data files that must survive). In-process and before any model is built, so each case is quick."""
import json
import os

import h5py
import numpy as np
import pytest

import glow
import nice
from flowkit.files import CONFIG_ATTR

NICE_ARCH = ["--hidden", "8", "--hidden-layers", "1", "--couplings", "2"]
GLOW_ARCH = ["--level", "1", "--depth", "1", "--hidden", "4"]


def _run(root, name, record, epochs=2):
    """An earlier run as training leaves it: best weights and NAME.run/ with its state and last
    backup, each weights file with its architecture record (HDF5 files holding only the record)."""
    os.makedirs(root / f"{name}.run")
    for path in (root / f"{name}.weights.h5", root / f"{name}.run" / f"epoch-{epochs:04d}.weights.h5"):
        with h5py.File(path, "w") as f:
            f.attrs[CONFIG_ATTR] = json.dumps(record)
    (root / f"{name}.run" / "state.json").write_text(json.dumps(
        {"epoch": epochs, "weights": f"epoch-{epochs:04d}.weights.h5", "best": 700.0, "collapses": 0}))


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A working folder with data, an earlier run of each script and a grid; returns its snapshot."""
    digits = np.random.RandomState(0).randint(0, 256, (30, 28, 28)).astype(np.uint8)
    np.savez(tmp_path / "good.npz", x_train=digits[:20], x_test=digits[20:])
    np.savez(tmp_path / "keys.npz", images=digits)
    np.savez(tmp_path / "dtype.npz", x_train=digits[:20].astype(np.float32), x_test=digits[20:])
    np.savez(tmp_path / "shape.npz", x_train=digits[:20].reshape(20, -1), x_test=digits[20:])
    (tmp_path / "junk.npz").write_text("not a zip file\n")
    (tmp_path / "afile").write_text("a regular file, so afile/sub cannot be a folder\n")
    os.makedirs(tmp_path / "empty" / "sub")
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("no images here\n")
    os.makedirs(tmp_path / "out")
    (tmp_path / "out" / "old.png").write_bytes(b"an earlier grid")
    _run(tmp_path, "nprev", {"model": "nice", "hidden": 8, "hidden_layers": 1, "couplings": 2})
    _run(tmp_path, "gprev", {"model": "glow", "img_size": 32, "level": 1, "depth": 1, "hidden": 4,
                             "permute": "random", "coupling": "additive", "mask": "channel", "channels": 1})
    (tmp_path / "lone.weights.h5").write_bytes(b"weights without a run folder")
    with h5py.File(tmp_path / "cut.weights.h5", "w") as f:  # a download cut short: half an HDF5 file
        f.attrs[CONFIG_ATTR] = json.dumps({"model": "nice", "hidden": 8, "hidden_layers": 1, "couplings": 2})
        f["layers/dense/vars/0"] = np.ones((64, 64), np.float32)
    whole = (tmp_path / "cut.weights.h5").read_bytes()
    (tmp_path / "cut.weights.h5").write_bytes(whole[:len(whole) // 2])
    monkeypatch.chdir(tmp_path)
    return snapshot(tmp_path)


def snapshot(root):
    """{relative path: (mtime, bytes)} of every file, and every folder's name."""
    files = {}
    for dirpath, dirs, names in os.walk(root):
        for n in dirs + names:
            p = os.path.join(dirpath, n)
            if os.path.isdir(p):  # a folder's own mtime moves with check_writable's probe file: not compared
                files[os.path.relpath(p, root)] = "folder"
            else:
                files[os.path.relpath(p, root)] = (os.stat(p).st_mtime_ns, open(p, "rb").read())
    return files


NICE_CASES = [
    (["--data", "nowhere.npz"], "error: --data nowhere.npz: no such file"),
    (["--data", "empty"], "error: --data empty: is a folder"),
    (["--data", "junk.npz"], "not a readable .npz file"),
    (["--data", "keys.npz"], "missing array(s) x_train, x_test"),
    (["--data", "dtype.npz"], "x_train must be uint8 images of shape (n, 28, 28)"),
    (["--data", "shape.npz"], "x_train must be uint8 images of shape (n, 28, 28)"),
    (["--epochs", "0"], "--epochs: must be positive"),
    (["--batch-size", "0"], "--batch-size: must be positive"),
    (["--std", "-0.1"], "--std: must be ≥ 0"),
    (["--max-collapses", "0"], "--max-collapses: must be positive"),
    (["--batch-size", "64"], "error: --batch-size 64 is larger than the 20 training images"),
    (["--out", "afile/sub"], "error: --out afile/sub: cannot write in afile/sub: "),
    (["--weights", "afile/w.weights.h5"], "error: --weights afile/w.weights.h5: cannot write in afile"),
    (["--weights", "nprev.weights.h5"], "error: an earlier run is in nprev.run/ (best weights: nprev.weights.h5): "
                                        "continue it with --resume, or start afresh with another --weights"),
    (["--weights", "lone.weights.h5"], "error: --weights lone.weights.h5 already exists"),
    (["--weights", "new.weights.h5", "--resume"], "error: --resume: nothing to resume, no completed epoch in new.run/"),
    (["--weights", "nprev.weights.h5", "--resume", "--hidden", "16"],
     "error: --resume: the run in nprev.run/ was trained with --hidden 8 (this run: --hidden 16); pass the same flags"),
    (["--weights", "nprev.weights.h5", "--resume", "--epochs", "2"],
     "error: --resume: the run in nprev.run/ has completed 2 epochs already (--epochs 2 is the total)"),
    (["--weights", "nprev.weights.h5", "--resume", "--sample-only"], "--resume continues training"),
    (["--xla", "--distribute", "mirrored"], "--xla does not go with --distribute mirrored"),
    (["--weights", "lone.weights.h5", "--sample-only"], "error: --weights lone.weights.h5: unreadable: not an HDF5"),
    (["--weights", "cut.weights.h5", "--sample-only"], "error: --weights cut.weights.h5: unreadable: not an HDF5 "
                                                       "weights file, or a truncated one"),
    (["--weights", "nprev.weights.h5", "--walk", "--couplings", "4"],
     "error: --weights nprev.weights.h5 was trained with --couplings 2 (this run: --couplings 4)"),
]

GLOW_CASES = [
    (["--data", "nowhere"], "error: --data nowhere: no such folder or file"),
    (["--data", "afile"], "error: --data afile: expected a folder of images or an mnist.npz file"),
    (["--data", "empty", "--img-size", "8"], "error: --data empty: no image files"),
    (["--data", "nowhere.npz"], "error: --data nowhere.npz: no such folder or file"),
    (["--data", "junk.npz"], "not a readable .npz file"),
    (["--data", "keys.npz"], "missing array(s) x_train, x_test"),
    (["--data", "dtype.npz"], "x_train must be uint8 images of shape (n, 28, 28)"),
    (["--data", "shape.npz"], "x_train must be uint8 images of shape (n, 28, 28)"),
    (["--data", "empty", "--img-size", "20", "--level", "3"], "error: --img-size 20 must be a multiple of 2^level = 8"),
    (["--level", "0"], "error: argument --level: must be positive, got 0"),
    (["--depth", "0"], "error: argument --depth: must be positive, got 0"),
    (["--epochs", "0"], "error: argument --epochs: must be positive, got 0"),
    (["--batch-size", "0"], "error: argument --batch-size: must be positive, got 0"),
    (["--depth", "x"], "error: argument --depth: 'x' is not an integer"),
    (["--std", "-1"], "error: argument --std: must be ≥ 0, got -1"),
    (["--max-collapses", "0"], "error: argument --max-collapses: must be positive, got 0"),
    (["--batch-size", "64"], "error: --batch-size 64 is larger than the 20 training images"),
    (["--out", "afile/sub"], "error: --out afile/sub: cannot write in afile/sub: "),
    (["--weights", "afile/g.weights.h5"], "error: --weights afile/g.weights.h5: cannot write in afile"),
    (["--weights", "gprev.weights.h5"], "error: an earlier run is in gprev.run/ (best weights: gprev.weights.h5): "
                                        "continue it with --resume, or start afresh with another --weights"),
    (["--weights", "lone.weights.h5"], "error: --weights lone.weights.h5 already exists"),
    (["--weights", "new.weights.h5", "--resume"], "error: --resume: nothing to resume, no completed epoch in new.run/"),
    (["--weights", "gprev.weights.h5", "--resume", "--permute", "conv", "--depth", "2"],
     "error: --resume: the run in gprev.run/ was trained with --depth 1 (this run: --depth 2), "
     "--permute random (this run: --permute conv); pass the same flags"),
    (["--weights", "gprev.weights.h5", "--resume", "--epochs", "1"],
     "error: --resume: the run in gprev.run/ has completed 2 epochs already (--epochs 1 is the total)"),
    (["--weights", "gprev.weights.h5", "--resume", "--reconstruct"], "--resume continues training"),
    (["--weights", "lone.weights.h5", "--sample-only"], "error: --weights lone.weights.h5: unreadable: not an HDF5"),
    (["--weights", "cut.weights.h5", "--temperatures", "0,1"], "error: --weights cut.weights.h5: unreadable"),
    (["--weights", "gprev.weights.h5", "--sample-only", "--hidden", "16"],
     "error: --weights gprev.weights.h5 was trained with --hidden 4 (this run: --hidden 16); leave the flags out"),
    (["--weights", "nprev.weights.h5", "--temperatures", "0,1"],
     "error: --weights nprev.weights.h5 holds a nice model, not a glow one"),
]


def _check(main, argv, says, folder, capsys):
    rc = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert rc == 2, (rc, captured.err[-1000:])
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
    assert snapshot(os.getcwd()) == folder  # nothing created, changed or removed


@pytest.mark.parametrize("argv, says", NICE_CASES, ids=[" ".join(a) for a, _ in NICE_CASES])
def test_nice_bad_input(folder, capsys, argv, says):
    base = ["--data", "good.npz", "--epochs", "3", "--out", "out", "--weights", "w.weights.h5", *NICE_ARCH]
    _check(nice.main, base + argv, says, folder, capsys)


@pytest.mark.parametrize("argv, says", GLOW_CASES, ids=[" ".join(a) for a, _ in GLOW_CASES])
def test_glow_bad_input(folder, capsys, argv, says):
    base = ["--data", "good.npz", "--epochs", "3", "--steps-per-epoch", "2", "--batch-size", "4",
            "--out", "out", "--weights", "w.weights.h5", *GLOW_ARCH]
    _check(glow.main, base + argv, says, folder, capsys)
