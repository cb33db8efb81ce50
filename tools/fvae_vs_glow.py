"""The f-VAEs article's claim, measured: with a smaller flow, f-VAE reaches a given bits/dim sooner than
Glow. Both scripts train on MNIST for the same wall-clock budget (each stopped by Ctrl-C at the
budget, which keeps its best weights and its epoch log NAME.csv with `minutes` and `val_bpd`); then one
markdown table (test bits/dim against time) and one plot. f-VAE's figure is its ELBO bound, an upper
bound on its NLL; Glow's is its exact NLL: the comparison is conservative for f-VAE.

    python -m tools.fvae_vs_glow --minutes 5                  # ~10 min: the two runs in turn
    python -m tools.fvae_vs_glow --plot-only --runs runs/     # the table and plot of runs already made
"""
import argparse
import os
import signal
import subprocess
import sys
import time

from flowkit.curves import curve_table, plot_curves, read_curve

LABELS = {"fvae": "f-VAE (ELBO bound)", "glow": "Glow (NLL)"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--lr", "1e-3", "--batch-size", "64", "--epochs", "1000"]
RUNS = {  # name: (script, flags): Glow's flow on x, f-VAE's smaller flow on z
    "glow": ("glow.py", ["--level", "2", "--depth", "4", "--hidden", "64"]),
    "fvae": ("fvae.py", ["--level", "2", "--depth", "2", "--hidden", "64"]),
}


def run(name, folder, minutes, more=()):
    script, flags = RUNS[name]
    cmd = [sys.executable, os.path.join(ROOT, script), *flags, *COMMON, *more,
           "--weights", os.path.join(folder, f"{name}.weights.h5"), "--out", os.path.join(folder, f"{name}_pics")]
    print(" ".join(cmd[1:]), flush=True)
    path = os.path.join(folder, f"{name}.log")
    with open(path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=minutes * 60)
        except subprocess.TimeoutExpired:
            stop(proc, path)


def stop(proc, log_path, patience=10):
    """Ctrl-C (SIGINT) to a script, again every `patience` seconds until it says it is stopping: the
    scripts stop after the step and keep their best weights, but a SIGINT that arrives while TensorFlow
    is still importing is lost (TensorFlow 2.21's import swallows it) and the run would go on."""
    while proc.poll() is None:
        with open(log_path, errors="replace") as f:
            heard = "interrupted: stopping" in f.read()
        if not heard:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=patience)
        except subprocess.TimeoutExpired:
            pass


def read_log(folder, name):
    """(figure label, [(minutes, test bits/dim, steps)]) of a run's epoch log ([] when none finished)."""
    path = os.path.join(folder, f"{name}.csv")
    return read_curve(path) if os.path.isfile(path) else ("test bits/dim", [])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=5.0, help="wall-clock budget of each run")
    p.add_argument("--runs", default="runs", help="folder for the weights, logs and pictures of the runs")
    p.add_argument("--out", default="samples", help="folder for fvae_vs_glow.png")
    p.add_argument("--plot-only", action="store_true", help="no training: table and plot from --runs")
    p.add_argument("--data", help="passed to both scripts (default: their MNIST)")
    p.add_argument("--steps-per-epoch", type=int, default=50, help="steps between two test figures")
    args = p.parse_args(argv)
    more = ["--steps-per-epoch", str(args.steps_per_epoch)] + (["--data", args.data] if args.data else [])
    os.makedirs(args.runs, exist_ok=True)
    if not args.plot_only:
        for name in RUNS:
            start = time.time()
            run(name, args.runs, args.minutes, more)
            print(f"{name}: {(time.time() - start) / 60:.1f} min", flush=True)
    logs = {LABELS[name]: read_log(args.runs, name) for name in RUNS}
    last = max([rows[-1][0] for _, rows in logs.values() if rows] or [1])
    print(curve_table(logs, range(1, max(1, round(last)) + 1)))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "fvae_vs_glow.png")
    plot_curves({k: v for k, v in logs.items() if v[1]}, path, xlabel="wall-clock minutes (2 shared CPU cores)")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
