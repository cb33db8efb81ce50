"""How fast flow trains and samples on this machine, measured in one process.

    python bench.py                  # the full table (≈ 10 min on 2 CPU cores), written to bench.json
    python bench.py --skip-big       # without the article's 64² Glow (≈ 4 min)
    python bench.py --quick          # a tiny version of every measurement (the test suite runs it)

What it measures, each with warm-up excluded and the median of --repeats timed runs:
  - the backend's fp32 matmul peak (keras.ops.matmul on TensorFlow): 2048² and NICE's shape
    (128×1000)·(1000×1000);
  - NICE at the article's configuration (batch 128, 5 × Dense(1000), 4 couplings; random pixels,
    no download) and Glow at a CPU-sized configuration: training img/s through `fit` as the scripts
    compile it (the default path), and the same model compiled the old way (no XLA, one step per
    execution) and with other settings, interleaved round by round so that load from other processes
    hits every variant alike; the ratios are the point, the absolute figures move with the load;
  - utilisation = model FLOPs ÷ time ÷ the 2048² matmul peak. Model FLOPs are counted from the layer
    shapes: 2 × the multiply-adds of every Dense, Conv2D and 1×1-conv (InvDense) kernel at the spatial
    size it runs on, forward; training = 3 × forward (the backward pass costs two matmuls per forward
    one). Element-wise ops, biases, activations, permutations and the optimizer are not counted;
  - CPU time per step (time.process_time), beside wall time: on a machine shared with other jobs the
    wall time of a step swings by 2× from round to round, the work a step costs does not; a variant's
    "× CPU time" is the ratio of median CPU seconds per step (it counts the thread pools' spinning too);
  - first-step latency: the first `fit` call of one step (tracing, XLA compilation, optimizer build);
  - sampling: a 15×15 NICE grid and a 9×9 Glow grid, each decoded in one batched call;
  - a few steps of the Glow article's 64² configuration (L3, K10, hidden 512, batch 64) unless --skip-big;
  - peak resident memory of the process (getrusage) after each part.
"""
import argparse
import datetime
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time

import flow_utils  # noqa: E402, F401  first: TensorFlow loads with its start-up notices off stderr
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import glow  # noqa: E402
import nice  # noqa: E402
from flow_layers import InvDense, initialize_actnorms  # noqa: E402
from flow_utils import sample  # noqa: E402

FULL = {
    "matmul": [(2048, 2048, 2048), (128, 1000, 1000)],
    "nice": dict(batch=128, hidden=1000, hidden_layers=5, couplings=4, steps=4, grid=15),
    "glow": dict(img=32, channels=3, level=3, depth=4, hidden=256, batch=32, steps=2, grid=9),
    "glow_64": dict(img=64, channels=3, level=3, depth=10, hidden=512, batch=64, steps=1, grid=9),
    "repeats": 7,
}
QUICK = {
    "matmul": [(256, 256, 256), (16, 64, 64)],
    "nice": dict(batch=16, hidden=32, hidden_layers=1, couplings=2, steps=2, grid=3),
    "glow": dict(img=8, channels=3, level=2, depth=1, hidden=8, batch=4, steps=1, grid=3),
    "glow_64": None,
    "repeats": 1,
}
# (name, jit_compile, steps_per_execution); None = as the script compiles it (the default path)
VARIANTS = [("default", None, None), ("no_jit_spe1", False, 1), ("jit_spe1", True, 1), ("jit_spe4", True, 4)]


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --- matmul peak ------------------------------------------------------------------------------

def matmul_gflops(m, k, n, repeats):
    """fp32 GFLOP/s of keras.ops.matmul (m×k)·(k×n), median of `repeats` runs of ≥ 0.2 s each."""
    a = keras.random.normal((m, k), seed=1)
    b = keras.random.normal((k, n), seed=2)
    keras.ops.convert_to_numpy(keras.ops.matmul(a, b))  # warm-up
    inner = max(1, int(0.2 / max(timed(lambda: keras.ops.convert_to_numpy(keras.ops.matmul(a, b))), 1e-6)))

    def run():
        for _ in range(inner):
            c = keras.ops.matmul(a, b)
        keras.ops.convert_to_numpy(c)

    seconds = statistics.median(timed(run) for _ in range(repeats)) / inner
    return 2 * m * k * n / seconds / 1e9


# --- FLOPs from the layer shapes --------------------------------------------------------------

def forward_flops(model):
    """Forward matmul FLOPs per example (2 per multiply-add) of every Dense, Conv2D (stride 1, 'same'
    padding, as all of ours are) and InvDense inside the model's top-level layers, at the spatial size
    of each top-level layer's first input."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        x = layer.input[0] if isinstance(layer.input, (list, tuple)) else layer.input
        pixels = math.prod(x.shape[1:-1])  # H·W on images, 1 on vectors
        for sub in [layer, *layer._flatten_layers(include_self=False, recursive=True)]:
            if isinstance(sub, (keras.layers.Dense, keras.layers.Conv2D)):
                total += 2 * math.prod(sub.kernel.shape) * pixels
            elif isinstance(sub, InvDense):
                total += 2 * sub.l.shape[0] ** 2 * pixels
    return total


# --- training ---------------------------------------------------------------------------------

def recompile(model, jit, spe):
    """The same optimizer type, learning rate and loss as the script's compile, with other settings."""
    if jit is None:
        return
    opt = model.optimizer
    model.compile(optimizer=type(opt)(float(opt.learning_rate.numpy())), loss=model.loss,
                  jit_compile=jit, steps_per_execution=spe)


def train_settings(model):
    return {"jit_compile": bool(model.jit_compile), "steps_per_execution": int(model.steps_per_execution)}


def bench_training(make, data, batch, steps, repeats, variants, flops_per_image, peak):
    """Every variant: first-step latency, then `repeats` rounds (after one warm-up round) in which the
    variants run `fit` for `steps` steps each, back to back. Seconds per step: the median over rounds.
    Speed-ups against no_jit_spe1 are paired: the median over rounds of the two times within a round,
    so that load from other processes, which drifts over seconds, largely cancels."""
    dataset = tf.data.Dataset.from_tensors(data).repeat()
    models, results = {}, {}
    for name, jit, spe in variants:
        model = make()
        recompile(model, jit, spe)
        spe_ = int(model.steps_per_execution)
        first = timed(lambda: model.fit(dataset, steps_per_epoch=spe_, epochs=1, verbose=0, shuffle=False))
        models[name] = (model, max(spe_, steps // spe_ * spe_))
        results[name] = {**train_settings(model), "first_step_s": first}
    times = {name: [] for name in models}
    cpu = {name: [] for name in models}
    for round_ in range(repeats + 1):
        for name, (model, n) in models.items():
            c = time.process_time()
            t = timed(lambda: model.fit(dataset, steps_per_epoch=n, epochs=1, verbose=0, shuffle=False))
            if round_:  # round 0 is the warm-up
                times[name].append(t / n)
                cpu[name].append((time.process_time() - c) / n)
    for name, secs in times.items():
        step = statistics.median(secs)
        results[name].update(step_s=step, best_step_s=min(secs), rounds_step_s=secs,
                             cpu_step_s=statistics.median(cpu[name]), img_per_s=batch / step,
                             utilisation=3 * flops_per_image * batch / step / (peak * 1e9))
        loss = models[name][0].evaluate(dataset, steps=1, verbose=0)
        results[name]["loss_finite"] = bool(np.isfinite(loss))
    if "no_jit_spe1" in times:
        base = times["no_jit_spe1"]
        for name, secs in times.items():
            results[name]["speedup_vs_no_jit_spe1"] = statistics.median(b / t for b, t in zip(base, secs))
            results[name]["cpu_speedup_vs_no_jit_spe1"] = (results["no_jit_spe1"]["cpu_step_s"]
                                                           / results[name]["cpu_step_s"])
    return results


def bench_nice(cfg, repeats, peak, variants):
    rng = np.random.RandomState(0)
    x = (rng.randint(0, 256, (cfg["batch"], nice.DIM)) / 255).astype("float32")

    def make():
        keras.utils.set_random_seed(0)
        encoder, decoder, _ = nice.build_nice(cfg["hidden"], cfg["hidden_layers"], cfg["couplings"])
        nice.compile_nice(encoder, 1e-3)
        made.append(decoder)
        return encoder

    made = []
    encoder = make()
    flops = forward_flops(encoder)
    out = {"config": cfg, "forward_mflop_per_image": flops / 1e6, "train_mflop_per_image": 3 * flops / 1e6}
    out["variants"] = bench_training(make, (x, x), cfg["batch"], cfg["steps"], repeats, variants, flops, peak)
    out.update({k: out["variants"]["default"][k] for k in
                ("img_per_s", "utilisation", "first_step_s", "jit_compile", "steps_per_execution")})
    decoder = made[-1]
    n = cfg["grid"]
    first = timed(lambda: sample(decoder, n * n, 0.75))
    grid = statistics.median(timed(lambda: sample(decoder, n * n, 0.75)) for _ in range(repeats))
    out.update(sample_first_s=first, sample_grid_s=grid, sample_img_per_s=n * n / grid)
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def bench_glow(cfg, repeats, peak, variants):
    rng = np.random.RandomState(0)
    shape = (cfg["batch"], cfg["img"], cfg["img"], cfg["channels"])
    x = rng.uniform(-1, 1, shape).astype("float32")
    y = np.zeros(cfg["batch"], "float32")
    made = []

    def make():
        keras.utils.set_random_seed(0)
        encoder, decoder = glow.build_glow(cfg["img"], cfg["channels"], cfg["level"], cfg["depth"],
                                           cfg["hidden"])
        glow.compile_glow(encoder)
        initialize_actnorms(encoder, x)  # eager, before fit, as glow.py does
        made.append(decoder)
        return encoder

    out = {"config": cfg}
    encoder = make()
    flops = forward_flops(encoder)
    out.update(forward_gflop_per_image=flops / 1e9, train_gflop_per_image=3 * flops / 1e9)
    del encoder
    made.clear()
    out["variants"] = bench_training(make, (x, y), cfg["batch"], cfg["steps"], repeats, variants, flops, peak)
    out.update({k: out["variants"]["default"][k] for k in
                ("img_per_s", "step_s", "utilisation", "first_step_s", "jit_compile", "steps_per_execution")})
    decoder = made[-1]
    n = cfg["grid"]
    first = timed(lambda: glow.sample_grid(decoder, 0.9, 0, n))
    grid = statistics.median(timed(lambda: glow.sample_grid(decoder, 0.9, 0, n)) for _ in range(repeats))
    out.update(sample_first_s=first, sample_grid_s=grid, sample_img_per_s=n * n / grid)
    out["peak_rss_mib"] = peak_rss_mib()
    return out


# --- report -----------------------------------------------------------------------------------

def variant_line(m):
    return ", ".join(f"{name} {v['img_per_s']:.1f}" for name, v in m["variants"].items())


def table(r):
    rows = [("fp32 matmul peak, " + r["matmul"][0]["shape"], f"{r['matmul'][0]['gflops']:.1f} GFLOP/s"),
            ("fp32 matmul, NICE's shape " + r["matmul"][1]["shape"], f"{r['matmul'][1]['gflops']:.1f} GFLOP/s")]
    for key, label in (("nice", "NICE"), ("glow", "Glow (CPU-sized)"), ("glow_64", "Glow 64² (article)")):
        m = r.get(key)
        if not m:
            continue
        c = m["config"]
        desc = (f"batch {c['batch']}, {c['hidden_layers']}×{c['hidden']}, {c['couplings']} couplings"
                if key == "nice" else
                f"{c['img']}²×{c['channels']}, L{c['level']} K{c['depth']}, hidden {c['hidden']}, batch {c['batch']}")
        rows.append((f"{label}: {desc}", ""))
        rows.append(("  train img/s (default path)", f"{m['img_per_s']:.1f}"))
        rows.append(("  utilisation of the 2048² peak", f"{100 * m['utilisation']:.1f} %"))
        rows.append(("  first step (trace/compile)", f"{m['first_step_s']:.1f} s"))
        for name, v in m["variants"].items():
            if name != "default":
                rows.append((f"  variant {name}: img/s (× wall, × CPU time vs no_jit_spe1)",
                             f"{v['img_per_s']:.1f} (×{v.get('speedup_vs_no_jit_spe1', math.nan):.2f}, "
                             f"×{v.get('cpu_speedup_vs_no_jit_spe1', math.nan):.2f})"))
        rows.append((f"  {c['grid']}×{c['grid']} grid decode (first call)",
                     f"{m['sample_grid_s']:.3f} s ({m['sample_first_s']:.2f} s)"))
        rows.append(("  peak RSS so far", f"{m['peak_rss_mib']:.0f} MiB"))
    rows.append(("peak RSS", f"{r['peak_rss_mib']:.0f} MiB"))
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, 1-2 steps: checks that it all runs")
    p.add_argument("--json", default="bench.json", help="where to write the results")
    p.add_argument("--skip-big", action="store_true", help="skip the article's 64² Glow (the slow part)")
    p.add_argument("--big-steps", type=int, default=2,
                   help="timed steps of the 64² Glow, one per round, after its first step and a warm-up step")
    p.add_argument("--skip-glow", action="store_true", help="skip both Glow measurements")
    p.add_argument("--no-variants", action="store_true",
                   help="measure only the default path, not the no-XLA / steps_per_execution variants")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (median)")
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    repeats = args.repeats or cfg["repeats"]
    # --quick: the default path and the baseline only (each variant costs a trace, and XLA a compile)
    variants = VARIANTS[:1] if args.no_variants else VARIANTS[:2] if args.quick else VARIANTS
    start = time.perf_counter()
    r = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
         "command": " ".join(["python", "bench.py", *(sys.argv[1:] if argv is None else argv)]),
         "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
         "backend": keras.backend.backend(), "keras": keras.__version__, "tensorflow": tf.__version__,
         "load_avg_start": list(os.getloadavg()), "repeats": repeats}
    r["matmul"] = [{"shape": f"({m}×{k})·({k}×{n})", "gflops": matmul_gflops(m, k, n, repeats)}
                   for m, k, n in cfg["matmul"]]
    peak = r["matmul"][0]["gflops"]
    print("matmul: " + ", ".join(f"{m['gflops']:.1f}" for m in r["matmul"]) + " GFLOP/s", flush=True)
    r["nice"] = bench_nice(cfg["nice"], repeats, peak, variants)
    print(f"NICE: {r['nice']['img_per_s']:.1f} img/s; " + variant_line(r["nice"]), flush=True)
    gc.collect()
    if not args.skip_glow:
        r["glow"] = bench_glow(cfg["glow"], repeats, peak, variants[:3])
        print(f"Glow: {r['glow']['img_per_s']:.1f} img/s; " + variant_line(r["glow"]), flush=True)
        gc.collect()
        if cfg["glow_64"] and not args.skip_big:
            r["glow_64"] = bench_glow(cfg["glow_64"], args.big_steps, peak, variants[:1])
            print(f"Glow 64²: {r['glow_64']['step_s']:.1f} s/step", flush=True)
    r["peak_rss_mib"] = peak_rss_mib()
    r["load_avg_end"] = list(os.getloadavg())
    r["total_s"] = time.perf_counter() - start
    print(table(r))
    print(f"load average at start {r['load_avg_start'][0]:.2f}, at end {r['load_avg_end'][0]:.2f}; "
          f"{r['total_s']:.0f} s in all; wrote {args.json}")
    folder = os.path.dirname(os.path.abspath(args.json))
    os.makedirs(folder, exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
