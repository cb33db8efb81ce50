"""Scoring a run's samples with flowkit.measures (the digit classifier's inception score, FID,
precision and recall), and its command line:

    python -m flowkit.score IMAGE.png [--grid N] [--rows]   score a sample grid (image_grid's layout)
    python -m flowkit.score OUT/NAME_scored.npz             score a script's --score samples again
    python -m flowkit.score --train [--seed S]              retrain the classifier, rewrite its weights

The scripts call `report` after training (the grid's `sample score:` line) and `score_samples` for
--score N. The trained weights are committed (weights/digit_classifier.weights.h5); loading never trains.
"""
import argparse
import os
import sys
import zipfile

import numpy as np

from flowkit import measures
from flowkit.files import UserError, atomic_write
from flowkit.sample import temperature_codes

TILES = (28, 32)    # MNIST tiles, and MNIST zero-padded to 32×32 (glow.py, fvae.py)
SAMPLES = 1000      # --score's default number of samples
SAMPLE_BATCH = 250  # --score draws and decodes this many at a time: memory stays small


# --- a run's samples ------------------------------------------------------------------------------

def digits(data=None):
    """Whether a run's images are MNIST digits, the classifier's domain: its --data is the default
    (None) or an npz in keras' mnist.npz layout. A folder of images is not scored."""
    return not (data and os.path.isdir(data))


def report(path, data=None, by_rows=False):
    """After a training run on digits (`data` its --data, see `digits`): prints the `sample score:` line
    of the grid PNG at `path` (by_rows: row i of the grid is digit i)."""
    if digits(data):
        print(score_png(path, by_rows=by_rows, data=data), flush=True)


def as_uint8(x):
    """Images in [0, 1] (b, h, w[, 1]) -> uint8 (b, h, w), rounded; NaN as 0, clipped."""
    x = np.asarray(x, np.float64)
    x = x[..., 0] if x.ndim == 4 and x.shape[-1] == 1 else x
    return np.round(np.clip(np.nan_to_num(x, nan=0.0), 0.0, 1.0) * 255).astype(np.uint8)


def score_samples(name, draw, dims, std, n=SAMPLES, seed=0, out=".", data=None, conditional=False,
                  batch=SAMPLE_BATCH):
    """--score N of every script: n samples x = draw(z, y) in [0, 1], z = std·ε (ε ~ N(0, I) of `dims`,
    seeded by `seed`, None as 0: the grid's samples come first), y = i mod 10 for a conditional model
    (else None), `batch` at a time; writes them to OUT/NAME_scored.npz (`out` the folder; uint8 `x`
    (n, h, w), and `y`) atomically and prints its path and the sample-score line against the held-out
    digits of `data` (which the file scores again: `python -m flowkit.score OUT/NAME_scored.npz`).
    Returns the line."""
    z = temperature_codes([std], n, dims, seed or 0)[0]
    y = (np.arange(n) % 10).astype(np.int32) if conditional else None
    x = np.concatenate([as_uint8(draw(z[i:i + batch], None if y is None else y[i:i + batch]))
                        for i in range(0, n, batch)])
    arrays = {"x": x} if y is None else {"x": x, "y": y.astype(np.uint8)}
    path = os.path.join(out, f"{name}_scored.npz")
    atomic_write(path, lambda tmp: np.savez_compressed(tmp, **arrays))
    print(f"wrote {path} ({n} samples, uint8 {'x and labels y' if conditional else 'x'})", flush=True)
    line = measures.sample_line(x, data)
    print(line, flush=True)
    return line


def scored_npz(path):
    """The images `x` of an npz that --score wrote, checked."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f.files:
                raise UserError(f"{path}: no array `x` (found: {', '.join(f.files) or 'none'}); expected --score's npz")
            return f["x"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"{path}: not a readable .npz file ({type(e).__name__})") from None


# --- grids and the command line ------------------------------------------------------------------

def grid_tiles(picture, grid=None):
    """A grid picture (flowkit.sample.image_grid / row_grid: tiles side by side, no gaps) -> (tiles
    (r·c, t, t) in row-major order, r rows). The tile side t is the picture's side / `grid` (an
    N×N grid), else the one of 28 and 32 that divides both sides."""
    picture = np.asarray(picture)
    if picture.ndim == 3:
        picture = picture[..., :3].mean(axis=-1)  # RGB(A) to grey; a grey PNG reads as 2-D already
    if picture.ndim != 2:
        raise UserError(f"expected a grey or RGB picture, got shape {picture.shape}")
    h, w = picture.shape
    if grid is not None:
        if grid < 1 or h != w or h % grid:
            raise UserError(f"--grid {grid}: the picture ({h}×{w}) is not an {grid}×{grid} grid of square tiles")
        tile = h // grid
        if tile not in TILES:
            raise UserError(f"--grid {grid}: tiles of {tile}×{tile} pixels; expected 28×28 or 32×32 digits")
    else:
        fits = [t for t in TILES if h % t == 0 and w % t == 0]
        if len(fits) != 1:
            raise UserError(f"cannot tell the tile size of a {h}×{w} picture"
                            + (" (both 28 and 32 fit); pass --grid N" if fits else
                               " (neither 28 nor 32 divides both sides)"))
        tile = fits[0]
    r, c = h // tile, w // tile
    tiles = picture.reshape(r, tile, c, tile).swapaxes(1, 2).reshape(r * c, tile, tile)
    return (tiles.astype(np.uint8) if picture.dtype == np.uint8 else tiles / 255.0), r


def score_png(path, grid=None, by_rows=False, data=None):
    """The score line of a grid PNG; by_rows: row i of the grid is digit i."""
    import imageio.v2 as imageio

    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        picture = imageio.imread(path)
    except Exception as e:  # imageio raises a variety of types for a file it cannot read
        raise UserError(f"{path}: not a readable image ({type(e).__name__})") from None
    tiles, r = grid_tiles(picture, grid)
    rows = None
    if by_rows:
        if r > 10:
            raise UserError(f"--rows: the grid has {r} rows; a class-conditional grid has at most 10 (one per digit)")
        rows = np.repeat(np.arange(r), len(tiles) // r)
    return measures.score_line(tiles, rows, data)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Score generated digits with an MNIST classifier "
                                            "(inception score, confident share, classes).")
    p.add_argument("image", nargs="?", help="a grid PNG of digits (as written by flowkit.sample.image_grid), "
                                            "or the NAME_scored.npz of a script's --score")
    p.add_argument("--grid", type=int, help="the picture is an N×N grid (default: tiles of 28 or 32 pixels)")
    p.add_argument("--rows", action="store_true", help="class-conditional grid: row i holds digit i")
    p.add_argument("--train", action="store_true",
                   help=f"retrain the classifier and rewrite {os.path.relpath(measures.WEIGHTS)}")
    p.add_argument("--seed", type=int, default=0, help="seed of --train (default 0)")
    args = p.parse_args(argv)
    if args.train == bool(args.image):
        p.error("give either IMAGE.png or --train")
    if args.train and (args.grid is not None or args.rows):
        p.error("--grid and --rows go with IMAGE.png, not --train")
    return args


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.train:
            accuracy = measures.train(args.seed)
            print(f"held-out accuracy {accuracy:.4f}; wrote {os.path.relpath(measures.WEIGHTS)} "
                  f"({os.path.getsize(measures.WEIGHTS) / 1024:.0f} KiB)")
            print(f"real held-out digits: {measures.in_words(measures.real_digit_ceiling())}")
        elif args.image.endswith(".npz"):
            if args.grid is not None or args.rows:
                raise UserError("--grid and --rows go with a grid PNG, not with --score's npz")
            if not os.path.isfile(args.image):
                raise UserError(f"{args.image}: no such file")
            print(measures.sample_line(scored_npz(args.image)))
        else:
            print(score_png(args.image, args.grid, args.rows))
        return 0
    except SystemExit as e:
        return e.code
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
