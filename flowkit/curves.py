"""Likelihood against time: the epoch logs NAME.csv that training writes beside NAME.weights.h5, read,
tabulated and plotted; the sample score of each epoch's grid against time beside it. The command that
draws several runs in one picture is tools/curves.py."""
import csv
import math
import os

from flowkit.files import UserError, atomic_write

CURVE_KEYS = (("val_bpd", "test bits/dim"), ("bpd", "training bits/dim"), ("val_loss", "test loss (nats)"))


def read_curve(path):
    """(label of the figure, [(minutes, figure, steps)]) from an epoch log NAME.csv: test bits/dim when
    the run logged them, else training bits/dim, else the test loss."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or type(e).__name__})") from None
    if not rows or "minutes" not in rows[0]:
        raise UserError(f"{path}: not an epoch log (no rows with a `minutes` column)")
    for key, label in CURVE_KEYS:
        if key in rows[0]:
            return label, [(float(r["minutes"]), float(r[key]), int(float(r.get("steps") or 0))) for r in rows]
    raise UserError(f"{path}: no column among {', '.join(k for k, _ in CURVE_KEYS)}")


def epoch_column(path, key):
    """{epoch counted from 1: figure} of one column of an epoch log (the last row of an epoch wins, as
    after a --resume); {} when the log or the column is missing."""
    try:
        with open(path, newline="") as f:
            return {int(r["epoch"]) + 1: float(r[key]) for r in csv.DictReader(f) if r.get(key) not in (None, "")}
    except (OSError, KeyError, ValueError):
        return {}


def kept(log, epoch, monitor, key="val_bpd"):
    """The last lines of a run: which epoch's weights were kept (`epoch`, from 1), by which rule
    (`monitor`), and their held-out figure `key` from the epoch log; under the training-loss rule also the
    best held-out figure the log saw, and its epoch (a small training set overfits)."""
    if epoch is None:
        return "no epoch's weights were kept (no finite figure to keep them by)"
    held_out = epoch_column(log, key)
    rule = "the lowest training loss, the article's rule" if monitor == "loss" else "the lowest held-out loss"
    line = f"kept the weights of epoch {epoch} ({rule}): {held_out.get(epoch, math.nan):.3f} held-out bits/dim"
    if monitor == "loss" and held_out:
        best = min(held_out, key=held_out.get)
        line += (f"\nthe best held-out figure was epoch {best}'s: {held_out[best]:.3f} bits/dim"
                 + (" (the same)" if best == epoch else "; --monitor val_loss keeps that one"))
    return line


def grid_scores(folder, log):
    """[(minutes, inception score, epoch)] of the per-epoch sample grids a run wrote to `folder`
    (NAME_epoch_NNN.png; f-VAE's first temperature, NAME_epoch_NNN_T1.png), each at the minutes its
    epoch ended in the epoch log, scored with flowkit.measures' digit classifier (a conditional TarFlow's
    grids are drawn at its --guidance)."""
    import re

    import imageio.v2 as imageio

    from flowkit import measures
    from flowkit import score as flow_score

    minutes = epoch_column(log, "minutes")
    if not os.path.isdir(folder):
        raise UserError(f"--grids {folder}: no such folder")
    scores = []
    for name in sorted(os.listdir(folder)):
        match = re.fullmatch(r"[a-z]+_epoch_(\d+)(_T1)?\.png", name)
        if match and int(match.group(1)) in minutes:
            tiles, _ = flow_score.grid_tiles(imageio.imread(os.path.join(folder, name)))
            epoch = int(match.group(1))
            scores.append((minutes[epoch], measures.score(tiles)["inception"], epoch))
    if not scores:
        raise UserError(f"--grids {folder}: no NAME_epoch_NNN.png grid of an epoch in {log}")
    return sorted(scores)


def first_at(scores, target=5.0):
    """'IS 5 after M min (epoch E)': the first grid whose score reaches `target`, or the best one's."""
    hit = next(((t, s, e) for t, s, e in scores if s >= target), None)
    if hit:
        return f"IS {target:g} after {hit[0]:.1f} min (epoch {hit[2]})"
    t, s, e = max(scores, key=lambda r: r[1])
    return f"IS {target:g} not reached; best IS {s:.2f} at {t:.1f} min (epoch {e})"


def curve_table(curves, marks, scores=None):
    """Markdown: per run, the best figure reached by each time mark (minutes); with `scores` ({name:
    grid_scores}), also each such run's best sample score by then."""
    scores = scores or {}
    columns = [*curves, *(f"{n} IS" for n in scores)]
    lines = ["| minutes | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for m in marks:
        low = [min((y for t, y, _ in rows if t <= m), default=None) for _, rows in curves.values()]
        high = [max((s for t, s, _ in rows if t <= m), default=None) for rows in scores.values()]
        cells = ["–" if y is None else f"{y:.3f}" for y in low] + ["–" if s is None else f"{s:.2f}" for s in high]
        lines.append(f"| {m:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(curves, path, xlabel="wall-clock minutes", title=None, ymax=None, scores=None):
    """{name: (figure label, rows)} -> one PNG, each run's figure against minutes (written atomically);
    `ymax` cuts the axis there (a one-epoch spike would otherwise flatten every curve). With `scores`
    ({name: grid_scores}), a second panel beside it: the sample score against minutes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def draw(ax, series):
        for name, rows in series.items():
            ax.plot([r[0] for r in rows], [r[1] for r in rows], marker="o", ms=2.5, lw=1.2, label=name)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)

    fig, axes = plt.subplots(1, 2 if scores else 1, figsize=(11 if scores else 6, 3.6), dpi=100, squeeze=False)
    ax = axes[0, 0]
    if scores:
        draw(axes[0, 1], scores)
        axes[0, 1].axhline(5, color="grey", lw=0.8, ls="--")
        axes[0, 1].set_ylabel("sample inception score (digit classifier)")
        axes[0, 1].legend(fontsize=8)
    draw(ax, {name: rows for name, (_, rows) in curves.items()})
    ax.set_ylabel(" / ".join(dict.fromkeys(label for label, _ in curves.values())))
    if title:
        ax.set_title(title, fontsize=9)
    if ymax is not None:
        ax.set_ylim(top=ymax)
    if curves:
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def plot_log(log):
    """One run's epoch log NAME.csv -> NAME.png beside it (a training script's --plot); returns the PNG."""
    png = log[: -len(".csv")] + ".png"
    plot_curves({os.path.basename(log)[: -len(".csv")]: read_curve(log)}, png)
    return png
