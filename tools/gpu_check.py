"""`python -m tools.bench --gpu-check`: each model at its article's configuration for a few dozen
training steps through `fit`, fed by its script's own data pipeline (flowkit.pipeline: tf.data on
TensorFlow, NumPy batches elsewhere), in float32 and mixed 16 bits, each without and with XLA where
XLA is a switch; per model × variant: img/s from the steady-state wall time (the first epoch of the
timed fit left out), CPU time per step and the cores it kept busy (CPU ÷ wall), the first step's time
(compile, tracing, XLA), and whether the training loss fell. Made for a GPU (mixed bfloat16 by default:
Hopper and Ampere have it, and it needs no loss scaling), it runs anywhere, on whichever Keras backend
runs (KERAS_BACKEND=jax needs no TensorFlow installed); --quick shrinks every model to a tiny size (the
test suite runs that on the CPU).

The variants per backend (`variants_here`): on TensorFlow fp32, fp32_xla, mixed, mixed_xla; on JAX
every step is jitted (XLA), so fp32 and mixed run with jit_compile=True and an _xla name stands for its
plain twin; on PyTorch fp32 and mixed run eagerly and the _xla ones are skipped.

The configurations: NICE as the article (batch 128, 4 couplings of 5 × Dense(1000)); Glow as the
article's 64×64×3 (L3, K10, hidden 512, batch 64); TarFlow as tarflow.py's defaults (patch 4, width
128, 4 blocks × 4 layers, 4 heads, batch 64), and again at the size of apple/ml-tarflow's MNIST
notebook (`tarflow_notebook`: patch 4, width 128, 4 blocks × 4 layers, heads of 64 channels,
class-conditional, batch 256); f-VAE and i-ResNet at their scripts' defaults. The images are
generated (smooth blobs quantised to 8 bits, no download), so the check needs no data.
"""
import time

from flowkit import backend
from flowkit.pipeline import batches, first
import keras
import numpy as np

import fvae
import glow
import iresnet
import nice
import tarflow
from flowkit.density import dequantize
from tools.measure import built, recompile, variants_here

MODELS = ("nice", "glow", "tarflow", "fvae", "iresnet")
EXTRA = {"tarflow": ("tarflow_notebook",)}  # further configurations checked with a model, by its script
SCRIPT = {"tarflow_notebook": "tarflow"}
ARTICLE = {
    "nice": dict(hidden=1000, hidden_layers=5, couplings=4, batch=128),
    "glow": dict(img=64, channels=3, level=3, depth=10, hidden=512, batch=64),
    "tarflow": dict(img=28, patch=4, width=128, blocks=4, layers=4, heads=4, conditional=False, batch=64),
    "tarflow_notebook": dict(img=28, patch=4, width=128, blocks=4, layers=4, heads=2, conditional=True, batch=256),
    "fvae": dict(img=32, squeezes=2, blocks=2, width=64, level=2, depth=4, hidden=64, batch=64),
    "iresnet": dict(img=28, stages=2, blocks=2, width=32, coeff=0.9, logdet="truncated", terms=4, batch=64),
}
TINY = {  # the learning rates raised so that a handful of steps shows the loss falling
    "nice": dict(hidden=32, hidden_layers=1, couplings=2, batch=16),
    "glow": dict(img=8, channels=3, level=2, depth=1, hidden=8, batch=8, lr=1e-3),
    "tarflow": dict(img=8, patch=4, width=8, blocks=1, layers=1, heads=2, conditional=False, batch=8),
    "tarflow_notebook": dict(img=8, patch=4, width=8, blocks=1, layers=1, heads=2, conditional=True, batch=16),
    "fvae": dict(img=8, squeezes=1, blocks=1, width=8, level=1, depth=1, hidden=8, batch=8),
    "iresnet": dict(img=8, stages=1, blocks=1, width=8, coeff=0.9, logdet="truncated", terms=2, batch=8),
}
POOL = 8  # generated images per model: POOL batches, shuffled and repeated as the scripts do


def pictures(n, side, channels, seed=0):
    """n generated 8-bit images (n, side, side, channels): three Gaussian blobs each, of random place,
    width and brightness per channel, on black: smooth, like digits or photos, not white noise."""
    rng = np.random.RandomState(seed)
    grid = np.arange(side) + 0.5
    out = np.zeros((n, side, side, channels))
    for _ in range(3):
        cy, cx = (rng.uniform(0, side, (n, 1, 1, 1)) for _ in range(2))
        r = rng.uniform(side / 8, side / 3, (n, 1, 1, 1))
        blob = np.exp(-((grid[:, None, None] - cy) ** 2 + (grid[None, :, None] - cx) ** 2) / (2 * r ** 2))
        out += blob * rng.uniform(0.3, 1, (n, 1, 1, channels))
    return np.clip(np.round(255 * out), 0, 255).astype("uint8")


def pipeline(key, c, seed=0):
    """(model's example batch x for its data-dependent init, the training dataset): the script's own
    pipeline (flowkit.pipeline) over POOL batches of generated images (random labels for a conditional TarFlow),
    repeated. `c`: a configuration of ARTICLE's or bench's kind."""
    b = c["batch"]
    k = pictures(POOL * b, c.get("img", 28), c.get("channels", 1), seed)
    if key == "nice":
        return None, nice.train_data(k[..., 0], b, seed=seed, repeat=True)
    if key == "glow":
        data = batches(k, b, glow.train_x, shuffle=True, seed=seed, repeat=True)
        return first(data, b), data
    if key == "tarflow":
        args = tarflow.parse_args(["--batch-size", str(b), "--seed", str(seed)] + ["--conditional"] * c["conditional"])
        y = np.random.RandomState(seed).randint(0, tarflow.CLASSES, len(k)).astype("int32")
        return None, tarflow.dataset(k, y, args, shuffle=True, repeat=True)
    if key == "fvae":
        latent = c["img"] ** 2  # E keeps as many dimensions as the image (fvae.build_encoder_net)
        data = batches(k, b, fvae.with_noise(latent), shuffle=True, seed=seed, repeat=True)
        return first(data, b), data
    if key == "iresnet":
        return dequantize(k[:b], 0, iresnet.BIN).astype("float32"), iresnet.batches(k, b, shuffle_seed=seed, repeat=True)
    raise ValueError(f"no such model {key!r}")


def build(key, c, x):
    """The model as its script builds and compiles it, initialised on the batch x where the script does."""
    from flow_layers import initialize_actnorms

    keras.utils.set_random_seed(0)
    shape = {k: v for k, v in c.items() if k not in ("batch", "img", "lr")}
    if key == "nice":
        model, _, _ = nice.build_nice(**shape)
        nice.compile_nice(model, 1e-3)
    elif key == "glow":
        model, _ = glow.build_glow(c["img"], **shape)
        glow.compile_glow(model)
    elif key == "tarflow":
        model, _, _ = tarflow.build_tarflow(img_size=c["img"], channels=1, **shape)
        tarflow.compile_tarflow(model)
    elif key == "fvae":
        made = fvae.build_fvae(c["img"], 1, **shape)
        fvae.compile_fvae(made)
        model = made.model
    else:
        model, _, _ = iresnet.build_iresnet((c["img"], c["img"], 1), **shape)
        iresnet.compile_flow(model, 3e-3)  # iresnet.py's rate
    if x is not None and key != "nice":
        initialize_actnorms(model, x)
    return model


class EpochClock(keras.callbacks.Callback):
    """Wall and CPU seconds of every epoch."""

    def __init__(self):
        super().__init__()
        self.wall, self.cpu = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter(), time.process_time()

    def on_epoch_end(self, epoch, logs=None):
        self.wall.append(time.perf_counter() - self.start[0])
        self.cpu.append(time.process_time() - self.start[1])


def check_model(key, c, variants, steps, epochs):
    """Every variant (name, precision, jit) of one model (or EXTRA configuration): the first step (compile,
    tracing, XLA, the first batch), then `epochs` epochs of `steps` steps; img/s, CPU per step and the
    cores kept busy (CPU ÷ wall) over all epochs but the first."""
    script = SCRIPT.get(key, key)
    x, data = pipeline(script, c)
    out = {}
    for name, precision, jit in variants:
        model = built(lambda: build(script, c, x), precision)
        start = time.perf_counter()
        recompile(model, jit)
        if "lr" in c:
            model.optimizer.learning_rate.assign(c["lr"])
        first = model.fit(data, steps_per_epoch=1, epochs=1, verbose=0, shuffle=False).history["loss"][0]
        first_s = time.perf_counter() - start
        clock = EpochClock()
        losses = model.fit(data, steps_per_epoch=steps, epochs=epochs, verbose=0, shuffle=False,
                           callbacks=[clock]).history["loss"]
        wall, cpu, n = sum(clock.wall[1:]), sum(clock.cpu[1:]), steps * (epochs - 1)
        out[name] = {"mixed_precision": precision or "none", "jit_compile": jit, "img_per_s": c["batch"] * n / wall,
                     "step_s": wall / n, "cpu_step_s": cpu / n, "cores": cpu / wall, "first_step_s": first_s,
                     "loss_first_step": first,
                     "loss_first_epoch": losses[0], "loss_last_epoch": losses[-1],
                     "loss_fell": bool(losses[-1] < losses[0])}  # epoch means: one batch's loss is noisy
        del model
    return out


def device():
    """The device the check ran on, in words: the backend's accelerators by name, else the CPU."""
    names = backend.device_names()
    if not names:
        from flowkit.devices import cpu_model
        return f"no GPU: CPU {cpu_model()}"
    return f"{len(names)} GPU(s): {names[0]}"


VARIANTS = ("fp32", "fp32_xla", "mixed", "mixed_xla")


def gpu_check(quick=False, models=MODELS, precision="bfloat16", variants=VARIANTS, steps=10, epochs=4):
    """{backend, device, precision, models: {model: {variant: figures}}}, printing one line per model ×
    variant; a model's EXTRA configurations follow it. `variants`: some of VARIANTS (float32 and
    `precision`, XLA off and on), as this backend runs them (tools.measure.variants_here)."""
    configs = TINY if quick else ARTICLE
    variants = variants_here(variants, [(n, None if n.startswith("fp32") else precision, n.endswith("_xla"))
                                        for n in VARIANTS])
    r = {"backend": backend.name(), "device": device(), "precision": precision, "steps_per_epoch": steps,
         "epochs": epochs, "models": {}}
    print(f"gpu-check on {r['device']}, {backend.describe()}; mixed = --mixed-precision {precision}; {epochs} epochs "
          f"of {steps} steps after the first step, img/s over the last {epochs - 1}; loss: the first epoch's mean -> "
          f"the last's", flush=True)
    for key in (k for m in models for k in (m, *EXTRA.get(m, ()))):
        r["models"][key] = check_model(key, configs[key], variants, steps, epochs)
        for name, v in r["models"][key].items():
            print(f"{key:16} {name:9} {v['img_per_s']:9.1f} img/s, {1e3 * v['step_s']:8.1f} ms/step "
                  f"({1e3 * v['cpu_step_s']:.1f} ms CPU, {v['cores']:.2f} cores), first step {v['first_step_s']:6.1f} s, loss "
                  f"{v['loss_first_epoch']:.4g} -> {v['loss_last_epoch']:.4g} ({'fell' if v['loss_fell'] else 'DID NOT FALL'})",
                  flush=True)
    return r
