"""The measurements of tools/bench.py: matmul peaks (2048² and at a model's own shapes), FLOPs counted from
a model's layer shapes, training speed of precision/XLA variants interleaved round by round, the
script's own default variant, and where a NICE or TarFlow step goes (--profile), on whichever Keras backend runs
(gradients and compiled functions through flowkit.backend). tools/bench.py holds the models and the report;
docs/running.md#performance says how to read the figures."""
import math
import os
import resource
import statistics
import time

from flowkit import backend
from flowkit.devices import choose_precision, choose_xla, set_mixed_precision
import keras
import numpy as np

from flow_layers import InvDense, ResidualFlow, SpectralConv2D, SpectralDense, TarBlock, flow_layers_of
from flowkit.kernels import gelu
from flowkit.optim import Adam
from flowkit.run import build_optimizer

# (name, --mixed-precision, jit_compile): float32 and mixed bfloat16, each without and with XLA
VARIANTS = [("fp32", None, False), ("fp32_xla", None, True), ("bf16", "bfloat16", False),
            ("bf16_xla", "bfloat16", True)]
BASE = "fp32"  # every ratio is against plain float32 in the same run


def xla_is_a_choice():
    """Whether XLA is a switch of the training step here: on TensorFlow (tf.function with or without
    jit_compile); JAX compiles every step with XLA (jax.jit; Keras without it runs the step op by op), and
    PyTorch has no XLA (its jit_compile is torch.compile, another thing)."""
    return backend.name() == "tensorflow"


def variants_here(names, variants=VARIANTS):
    """The `variants` (name, precision, jit) named in `names` as this backend runs them: TensorFlow's as
    they are; on JAX the plain ones jitted (jit_compile=True), the name of an _xla variant standing for
    its plain twin, the same program; on PyTorch the plain ones eager, the _xla ones left out."""
    if xla_is_a_choice():
        return [v for v in variants if v[0] in names]
    jit = backend.name() == "jax"
    wanted = {n.removesuffix("_xla") for n in names if jit or not n.endswith("_xla")}
    return [(n, precision, jit) for n, precision, xla in variants if not xla and n in wanted]
KERNELS = (keras.layers.Dense, keras.layers.Conv2D, InvDense, SpectralDense, SpectralConv2D)


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def spread(values):
    return [min(values), max(values)]


# --- matmul peaks -----------------------------------------------------------------------------

def matmul_gflops(m, k, n, repeats, dtype="float32", min_s=0.2):
    """GFLOP/s of keras.ops.matmul (m×k)·(k×n) in `dtype`, median of `repeats` runs of ≥ min_s each."""
    a = keras.ops.cast(keras.random.normal((m, k), seed=1), dtype)
    b = keras.ops.cast(keras.random.normal((k, n), seed=2), dtype)
    keras.ops.convert_to_numpy(keras.ops.matmul(a, b))  # warm-up
    inner = max(1, int(min_s / max(timed(lambda: keras.ops.convert_to_numpy(keras.ops.matmul(a, b))), 1e-6)))

    def run():
        for _ in range(inner):
            c = keras.ops.matmul(a, b)
        keras.ops.convert_to_numpy(c)

    seconds = statistics.median(timed(run) for _ in range(repeats)) / inner
    return 2 * m * k * n / seconds / 1e9


def shape_peak(shapes, repeats, min_s=0.2, top=3):
    """The peak at a model's own matmul shapes: the `top` shapes that carry the most of its FLOPs
    (`kernel_shapes`), each timed as one keras.ops.matmul in float32 and bfloat16; `gflops` per dtype
    ("none", "bfloat16") is their FLOP-weighted rate (Σ share ÷ Σ share/rate), what the model would
    reach if every counted matmul ran as fast as it does alone."""
    timed_shapes = []
    for (m, k, n), share in sorted(shapes.items(), key=lambda s: -s[1])[:top]:
        timed_shapes.append({"shape": f"({m}×{k})·({k}×{n})", "flop_share": share,
                             "gflops": {p: matmul_gflops(m, k, n, repeats, d, min_s)
                                        for p, d in (("none", "float32"), ("bfloat16", "bfloat16"))}})
    weight = sum(s["flop_share"] for s in timed_shapes)
    rate = {p: weight / sum(s["flop_share"] / s["gflops"][p] for s in timed_shapes) for p in ("none", "bfloat16")}
    return {"shapes": timed_shapes, "flop_share_timed": weight, "gflops": rate}


# --- FLOPs from the layer shapes --------------------------------------------------------------

def _zeros(model):
    x = [np.zeros((1, *i.shape[1:]), i.dtype) for i in model.inputs]
    return x[0] if len(x) == 1 else x


def kernel_calls(model):
    """[(layer, pixels, passes)] for every matmul layer inside the model (Dense, Conv2D — stride 1,
    'same' padding, as all of ours are —, InvDense, the spectral ones): `pixels` the spatial size of the
    input it sees (H·W on images, T on token sequences, 1 on vectors), recorded by one eager call on a
    zero example (the layers sit inside flows and coupling networks whose inputs have no fixed size);
    `passes` 1, or 1 + terms inside an i-ResNet block whose log-det series adds one vector-Jacobian
    product through g per term (roulette: its mean number of terms)."""
    counted = [l for l in flow_layers_of(model) if isinstance(l, KERNELS)]
    passes = {}
    for block in (l for l in flow_layers_of(model) if isinstance(l, ResidualFlow)):
        terms = {"truncated": block.terms, "roulette": block.terms + (1 - block.p) / block.p}.get(block.logdet, 0)
        passes.update({id(l): 1 + terms for l in flow_layers_of(block.g)})
    pixels = {}
    for layer in counted:
        def record(x, *args, layer=layer, call=layer.call, **kwargs):
            pixels.setdefault(id(layer), math.prod(x.shape[:-1]))  # one example: (1, ..., k) or (T, k)
            return call(x, *args, **kwargs)
        object.__setattr__(layer, "call", record)  # an instance attribute, removed below
    try:
        model(_zeros(model), training=False)
    finally:
        for layer in counted:
            del layer.__dict__["call"]
    return [(l, pixels[id(l)], passes.get(id(l), 1)) for l in counted if id(l) in pixels]


def _matmul(layer, pixels):
    """(m per example, k, n) of the layer as one matmul (a k×k convolution as its im2col product)."""
    if isinstance(layer, InvDense):
        c = layer.l.shape[0]
        return pixels, c, c
    shape = layer.kernel.shape
    return pixels, math.prod(shape[:-1]), shape[-1]


def forward_flops(model):
    """Forward matmul FLOPs per example (2 per multiply-add) of every kernel of `kernel_calls`, times its
    passes, plus a TarBlock's attention products (QKᵀ and AV, 2·T²·width each, per layer)."""
    total = sum(2 * math.prod(_matmul(l, p)) * passes for l, p, passes in kernel_calls(model))
    for net in (l.network for l in flow_layers_of(model) if isinstance(l, TarBlock)):
        total += net.depth * 2 * 2 * net.tokens ** 2 * net.width
    return total


def kernel_shapes(model, batch):
    """{(m, k, n): share of the kernels' forward FLOPs} of the model's matmuls at batch `batch`."""
    shapes = {}
    for layer, pixels, passes in kernel_calls(model):
        m, k, n = _matmul(layer, pixels)
        shapes[(m * batch, k, n)] = shapes.get((m * batch, k, n), 0) + 2 * m * k * n * passes
    total = sum(shapes.values()) or 1
    return {s: f / total for s, f in shapes.items()}


# --- training ---------------------------------------------------------------------------------

def recompile(model, jit):
    """The script's optimizer (its type and settings, fresh) and loss, XLA on or off."""
    opt = model.optimizer
    model.compile(optimizer=type(opt).from_config(opt.get_config()), loss=model.loss, jit_compile=jit)
    build_optimizer(model)  # as flowkit.run.Run does before fit


def built(make, precision):
    """make() under the --mixed-precision policy `precision` (None: float32); the policy is put back."""
    set_mixed_precision(precision)
    try:
        return make()
    finally:
        set_mixed_precision(None)


def default_variants(make, bf16_default, amx_xla=False):
    """(default variant, float32 default variant) of a script's long training run: its precision as
    `choose_precision` picks it with the script's `bf16_default` and `amx_xla` on this machine, XLA as
    `choose_xla` adds it or its compile resolves it under that precision (`model.jit_compile` after
    make(), which compiles as the script)."""
    def name(precision):
        xla = xla_is_a_choice() and (choose_xla(None, amx_xla, precision)[0] or built(make, precision).jit_compile is True)
        return ("bf16" if precision else "fp32") + ("_xla" if xla else "")
    precision = choose_precision(None, bf16_default, amx_xla=amx_xla)[0]
    fp32 = name(None)
    return (name(precision) if precision else fp32), fp32


def run_delay():
    """Thread-seconds the process's threads have spent runnable but waiting for a core (Linux' schedstat,
    summed over the threads alive now; two threads waiting at once count twice): on a shared machine,
    mostly the time other processes held the cores. 0 where there is no /proc."""
    total = 0
    for task in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ():
        try:
            with open(f"/proc/self/task/{task}/schedstat") as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            pass  # a thread that ended meanwhile
    return total / 1e9


class StepClock(keras.callbacks.Callback):
    """Wall time, CPU time (time.process_time: every thread of the process) and `run_delay` at the end of
    every step."""

    def on_train_begin(self, logs=None):
        self.marks = []

    def on_train_batch_end(self, batch, logs=None):
        self.marks.append((time.perf_counter(), time.process_time(), run_delay()))


def bench_training(make, dataset, batch, steps, repeats, variants, flops_per_image, peaks):
    """Every variant (a fresh model of the same seed under its policy, XLA on or off) fed by `dataset`,
    the script's own data pipeline: first-step latency, then `repeats` rounds (after one warm-up
    round) in which the variants run `fit` for 1 + `steps` steps each, back to back. A step's time is
    what the user waits for in a long run: the wall time from the end of fit's first step to the end of
    its last, over `steps` (fit's start and the iterator's first batch left out); CPU time beside it, and
    the thread-seconds its threads waited for a core (`run_delay`: other processes' share on a busy machine),
    and `cores`, the cores the step kept busy (CPU time ÷ wall time, the median over rounds).
    Seconds per step: the median over rounds. Ratios against fp32 are paired: the median over rounds of
    the two times within a round, with their spread (min, max), so that load from other processes, which
    drifts over seconds, largely cancels. `peaks`: GFLOP/s of "none" (float32) and "bfloat16", and
    "shape" {the same at the model's own shapes}."""
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
    waits = {name: [] for name in models}
    losses, clock = {}, StepClock()
    for round_ in range(repeats + 1):
        for name, model in models.items():
            losses[name] = model.fit(dataset, steps_per_epoch=1 + steps, epochs=1, verbose=0, shuffle=False,
                                     callbacks=[clock]).history["loss"][-1]
            if round_:  # round 0 is the warm-up
                (w0, c0, d0), (w1, c1, d1) = clock.marks[0], clock.marks[-1]
                times[name].append((w1 - w0) / steps)
                cpu[name].append((c1 - c0) / steps)
                waits[name].append((d1 - d0) / steps)
    for name, secs in times.items():
        step, own = statistics.median(secs), results[name]["mixed_precision"]
        flops = 3 * flops_per_image * batch / step / 1e9
        results[name].update(step_s=step, best_step_s=min(secs), rounds_step_s=secs,
                             cpu_step_s=statistics.median(cpu[name]), waiting_step_s=statistics.median(waits[name]),
                         cores=statistics.median(c / w for c, w in zip(cpu[name], secs)),
                             img_per_s=batch / step, gflops=flops,
                             utilisation=flops / peaks["none"], utilisation_bf16_peak=flops / peaks["bfloat16"],
                             utilisation_own_peak=flops / peaks[own],
                             utilisation_shape_peak=flops / peaks["shape"][own])
        results[name]["loss_finite"] = bool(np.isfinite(losses[name]))  # the last round's training loss
    base, base_cpu = times[BASE], cpu[BASE]
    for name, secs in times.items():
        ratios = [b / t for b, t in zip(base, secs)]
        cpu_ratios = [b / t for b, t in zip(base_cpu, cpu[name])]
        results[name].update(speedup_vs_fp32=statistics.median(ratios), speedup_spread=spread(ratios),
                             cpu_speedup_vs_fp32=statistics.median(cpu_ratios), cpu_speedup_spread=spread(cpu_ratios))
        results[name]["is_default"] = False
    return results


def summarise(out, default, fp32_default):
    """The model's headline figures: its default path's, and `utilisation` of its float32 default path."""
    v = out["variants"]
    out["default_variant"], out["fp32_default_variant"] = default, fp32_default
    v[default]["is_default"] = True
    out.update({k: v[default][k] for k in ("img_per_s", "step_s", "first_step_s", "speedup_vs_fp32",
                                           "cpu_speedup_vs_fp32")})
    out["utilisation"] = v[fp32_default]["utilisation"]


# --- where a NICE step goes ------------------------------------------------------------------

def median_call_s(fn, repeats):
    """Median seconds of `repeats` calls of fn() after one warm-up call (tracing, compiling), each until
    its first output is on the host."""
    def call():
        keras.ops.convert_to_numpy(keras.tree.flatten(fn())[0])
    call()
    return statistics.median(timed(call) for _ in range(repeats))


def fit_loss(model, inputs):
    """The loss `fit` minimises on one batch, on every backend: the prior term of the model's output plus
    the layers' add_loss terms (the flows' −log|det|), through Keras' stateless_call with the variables'
    current values, which collects those terms where JAX's compiled functions (a stateless scope) drop them."""
    from flowkit.density import prior_nll

    z, _, losses = model.stateless_call([v.value for v in model.trainable_variables],
                                        [v.value for v in model.non_trainable_variables], inputs,
                                        training=True, return_losses=True)
    return keras.ops.mean(prior_nll(None, z)) + sum(losses)


def compile_modes():
    """(jit, key) of the profiles' compiled functions: TensorFlow without and with XLA; JAX's jit (XLA);
    PyTorch as it runs (eager)."""
    if xla_is_a_choice():
        return (False, "plain"), (True, "xla")
    return ((True, "xla"),) if backend.name() == "jax" else ((False, "plain"),)


def profile_nice(repeats=15):
    """Seconds (median of `repeats` calls) of separate compiled functions (flowkit.backend.function) over
    the article's NICE at batch 128, each way `compile_modes` gives (on TensorFlow without and with XLA):
    forward, forward + backward, Keras' Adam update and flowkit.optim.Adam's fused one over all weights, a
    whole step with each, and the non-matmul layers alone (permutations, interleaved splits and concats,
    the scale layer)."""
    import nice
    from flow_layers import AffineCouple

    keras.utils.set_random_seed(0)
    encoder, _, flow = nice.build_nice()
    x = keras.ops.convert_to_tensor((np.random.RandomState(0).randint(0, 256, (128, nice.DIM)) / 255).astype("float32"))
    weights = encoder.trainable_variables

    def loss():
        return fit_loss(encoder, x)

    def grads():
        return backend.gradients(loss, weights)[1]

    def layout():
        h = x
        for layer in flow.steps:
            h = h if isinstance(layer, AffineCouple) else layer(h)
        return h

    out = {}
    for jit, key in compile_modes():
        compiled = lambda fn, *more: backend.function(fn, [*encoder.variables, *more], xla=jit)
        g = compiled(grads)()
        r = {"forward_s": median_call_s(compiled(loss), repeats),
             "forward_backward_s": median_call_s(compiled(grads), repeats),
             "layout_ops_s": median_call_s(compiled(layout), repeats)}
        for name, cls in (("keras_adam", keras.optimizers.Adam), ("fused_adam", Adam)):
            opt = cls(1e-3)
            opt.build(weights)
            update = compiled(lambda g: (opt.apply(g, weights), opt.iterations.value)[1], *opt.variables)
            r[f"{name}_update_s"] = median_call_s(lambda: update(g), repeats)
            r[f"step_{name}_s"] = median_call_s(compiled(lambda: (opt.apply(grads(), weights), opt.iterations.value)[1],
                                                         *opt.variables), repeats)
        out[key] = r
    return out


# --- where a TarFlow step goes ----------------------------------------------------------------

def profile_tarflow(cfg, repeats=15, precision=None):
    """Seconds (median of `repeats` calls) of separate compiled functions (flowkit.backend.function) over
    TarFlow's CPU recipe `cfg` (tools/bench.py's
    FULL["tarflow"]) under `precision` (None: float32): a whole training step (forward, backward, the
    fused AdamW update), forward + backward alone, the update alone; each part of the Transformer over
    all blocks and layers, forward + backward at the recipe's shapes: the layer norms, the QKV and output
    projections, the attention core (scores, mask, softmax, ·V), the MLP's two Dense layers and its GELU;
    and one batch of tarflow.dataset (noise drawn in the pipeline). "rest" is forward + backward less the
    parts: embeddings, the shift, exp(−a), the log-det and loss, and the layout ops around the heads."""
    import tarflow

    set_mixed_precision(precision)
    try:
        keras.utils.set_random_seed(0)
        shape = {k: cfg[k] for k in ("patch", "width", "blocks", "layers", "heads", "conditional")}
        encoder, _, flow = tarflow.build_tarflow(img_size=cfg["img"], channels=1, **shape)
        tarflow.compile_tarflow(encoder)
        build_optimizer(encoder)
    finally:
        set_mixed_precision(None)
    b, rng = cfg["batch"], np.random.RandomState(0)
    x = keras.ops.convert_to_tensor(rng.uniform(-1, 1, (b, cfg["img"], cfg["img"], 1)).astype("float32"))
    y = keras.ops.convert_to_tensor(rng.randint(0, tarflow.CLASSES, b).astype("int32"))
    weights, opt = encoder.trainable_variables, encoder.optimizer
    blocks = [step for step in flow.steps if isinstance(step, TarBlock)]
    nets = [block.network for block in blocks]
    t, w, heads = nets[0].tokens, nets[0].width, nets[0].heads
    h, wide = (b * t, w), (b * t, 4 * w)  # the shapes of the residual stream and of the MLP's inside
    compiled = lambda fn: backend.function(fn, [*encoder.variables, *opt.variables])

    def grads():
        return backend.gradients(lambda: fit_loss(encoder, [x, y]), weights)[1]

    def parts(fn, shapes, layers):
        """forward + backward of fn(attention, mlp, *inputs) for every Transformer layer of every block, on
        inputs of `shapes` drawn anew for each (equal inputs would let grappler compute a weightless part
        once), gradients to the inputs and the weights of layers(attention, mlp)."""
        pairs = [(a, m) for net in nets for a, m in zip(net.attentions, net.mlps)]
        draws = [[keras.ops.convert_to_tensor(rng.standard_normal(s).astype("float32")) for s in shapes] for _ in pairs]

        def total(a, m):
            return lambda *inputs: sum(keras.ops.sum(keras.ops.cast(o, "float32"))
                                       for o in keras.tree.flatten(fn(a, m, *inputs)))

        def run():
            out = []
            for (a, m), inputs in zip(pairs, draws):
                variables = [v for l in layers(a, m) for v in l.trainable_variables]
                out += backend.gradients(total(a, m), variables, inputs)[1]
            return out
        return compiled(run)

    median_s = lambda fn: median_call_s(fn, repeats)
    g = compiled(grads)()
    update = compiled(lambda g: (opt.apply(g, weights), opt.iterations.value)[1])
    mask, qkv = tarflow.Attention.causal_mask(t), [(b, heads, t, w // heads)] * 3
    to_16 = lambda v: keras.ops.cast(v, nets[0].attentions[0].qkv.compute_dtype)  # q, k, v as the qkv Dense returns them
    r = {"step_s": median_s(compiled(lambda: (opt.apply(grads(), weights), opt.iterations.value)[1])),
         "forward_backward_s": median_s(compiled(grads)),
         "adamw_update_s": median_s(lambda: update(g))}
    r["parts_s"] = {
        "layer norms": median_s(parts(lambda a, m, v: m.norm(a.norm(v)), [h], lambda a, m: [a.norm, m.norm])),
        "QKV and output projections": median_s(parts(lambda a, m, v: (a.qkv(v), a.out(v)), [h],
                                                     lambda a, m: [a.qkv, a.out])),
        "attention core": median_s(parts(lambda a, m, q, k, v: a.attend(to_16(q), to_16(k), to_16(v), mask),
                                         qkv, lambda a, m: [])),
        "MLP Dense layers": median_s(parts(lambda a, m, v, u: (m.dense_in(v), m.dense_out(u)), [h, wide],
                                           lambda a, m: [m.dense_in, m.dense_out])),
        "GELU": median_s(parts(lambda a, m, u: gelu(u), [wide], lambda a, m: []))}
    r["rest_s"] = r["forward_backward_s"] - sum(r["parts_s"].values())
    args = tarflow.parse_args(["--conditional", "--batch-size", str(b), "--epochs", "1"])
    k = rng.randint(0, 256, (b * 20, cfg["img"], cfg["img"], 1)).astype("uint8")
    batches = iter(tarflow.dataset(k, np.zeros(len(k), "int32"), args, shuffle=True).repeat())
    r["data_batch_s"] = median_s(lambda: next(batches)[0][0])
    return r
