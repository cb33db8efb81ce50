"""Likelihood against time for several runs in one picture: their epoch logs NAME.csv (written beside
NAME.weights.h5), with --grids the sample score of each epoch's grid against time beside them.

    python -m tools.curves runs/a.csv runs/b.csv --labels "run a,run b" --png runs/ab.png
    python -m tools.curves runs/rec/glow.csv --grids runs/rec/glow --png runs/rec/glow_curves.png
"""
import argparse
import math
import os
import sys

from flowkit.curves import curve_table, first_at, grid_scores, plot_curves, read_curve
from flowkit.files import UserError


def main(argv=None):
    """python -m tools.curves A.csv [B.csv ...]: the runs' figures in one PNG, and a table of the best
    figure by each time mark. A bad log is one line `error: ...` and exit code 2."""
    p = argparse.ArgumentParser(description="Plot epoch logs (NAME.csv beside NAME.weights.h5): test bits/dim "
                                            "against wall-clock minutes, several runs in one picture.")
    p.add_argument("logs", nargs="+", metavar="CSV", help="the runs' epoch logs")
    p.add_argument("--labels", help="comma-separated names for the runs (default: the file names)")
    p.add_argument("--png", default="curves.png", help="the picture to write (default: curves.png)")
    p.add_argument("--title", help="a title for the picture")
    p.add_argument("--ymax", type=float, help="top of the y axis (points above it are cut off)")
    p.add_argument("--grids", metavar="DIR,DIR,...",
                   help="each run's --out folder, in the logs' order (an empty name skips a run): its "
                        "per-epoch sample grids are scored and drawn against minutes beside the figure")
    p.add_argument("--marks", type=float, nargs="*", metavar="MIN",
                   help="time marks of the printed table (default: every whole minute, at most 20)")
    args = p.parse_args(argv)
    try:
        names = args.labels.split(",") if args.labels else [os.path.basename(c)[: -len(".csv")]
                                                             if c.endswith(".csv") else c for c in args.logs]
        if len(names) != len(args.logs):
            raise UserError(f"--labels: {len(names)} names for {len(args.logs)} logs")
        if args.marks and not all(m > 0 and math.isfinite(m) for m in args.marks):
            raise UserError(f"--marks {' '.join(f'{m:g}' for m in args.marks)}: minutes must be positive")
        curves = dict(zip(names, (read_curve(c) for c in args.logs)))
        folders = args.grids.split(",") if args.grids is not None else []
        if args.grids is not None and len(folders) != len(args.logs):
            raise UserError(f"--grids: {len(folders)} folders for {len(args.logs)} logs")
        scores = {n: grid_scores(d, log) for n, d, log in zip(names, folders, args.logs) if d}
        for name, rows in scores.items():
            print(f"{name}: {first_at(rows)}")
        last = max(rows[-1][0] for _, rows in curves.values())
        marks = args.marks or sorted({max(1, round(last * i / 20)) for i in range(1, 21)} if last > 20
                                     else range(1, max(1, math.ceil(last)) + 1))
        print(curve_table(curves, marks, scores))
        plot_curves(curves, args.png, title=args.title, ymax=args.ymax, scores=scores)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
