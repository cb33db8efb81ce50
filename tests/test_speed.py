"""Issue 14's choices, tested for what they do, not how fast: the precision default (with the CPU's
bfloat16 detection forced either way), --mixed-precision none, and the fused Adam's and AdamW's
arithmetic."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from flowkit import backend
from flowkit import cli as flow_cli
from flowkit import devices as flow_devices
import glow
import nice
from flowkit.devices import choose_precision, choose_xla, cpu_bfloat16, make_strategy, set_mixed_precision
from flowkit.optim import Adam, AdamW
from flowkit.run import Run


def fake_cpuinfo(tmp_path, flags):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nmodel name\t: a CPU\nflags\t\t: fpu sse2 " + " ".join(flags) + "\n\n")
    return str(path)


def test_cpu_bfloat16_reads_the_flags_line(tmp_path):
    assert cpu_bfloat16(fake_cpuinfo(tmp_path, ["avx512f", "avx512_bf16", "amx_bf16"])) == ["AVX512-BF16", "AMX-BF16"]
    assert cpu_bfloat16(fake_cpuinfo(tmp_path, ["avx2", "avx512f"])) == []
    assert cpu_bfloat16(str(tmp_path / "no_such_file")) == []  # not Linux: float32 stays


@pytest.mark.parametrize("flag, bf16_default, cpu, gpus, precision, why", [
    (None, True, ["AVX512-BF16"], [], "bfloat16", "CPU has AVX512-BF16"),
    (None, True, [], [], None, "CPU has no bfloat16 instructions"),           # the fallback
    (None, True, ["AVX512-BF16"], ["GPU:0"], None, "on a GPU 16 bits is opt-in"),
    (None, False, ["AVX512-BF16"], [], None, "this model's default"),
    ("none", True, ["AVX512-BF16"], [], None, "--mixed-precision none"),     # forces float32
    ("bfloat16", False, [], [], "bfloat16", "--mixed-precision bfloat16"),   # asked for: given
    ("float16", True, ["AVX512-BF16"], [], "float16", "--mixed-precision float16"),
])
def test_choose_precision(flag, bf16_default, cpu, gpus, precision, why):
    got, reason = choose_precision(flag, bf16_default, cpu_bf16=cpu, gpus=gpus)
    assert got == precision and why in reason


AMX = ["AVX512-BF16", "AMX-BF16"]  # an Intel Xeon of Sapphire Rapids' kind; AVX512-BF16 alone: AMD Zen 4


@pytest.mark.parametrize("amx_xla, cpu, precision, why", [
    (True, AMX, None, "CPU has AMX-BF16"),                     # TarFlow on AMX: float32 (with XLA)
    (True, ["AVX512-BF16"], "bfloat16", "CPU has AVX512-BF16"),  # TarFlow on Zen 4: bfloat16
    (False, AMX, "bfloat16", "CPU has AVX512-BF16, AMX-BF16"),   # NICE and Glow keep bfloat16 on AMX
])
def test_choose_precision_on_amx(amx_xla, cpu, precision, why):
    got, reason = choose_precision(None, True, cpu_bf16=cpu, gpus=[], amx_xla=amx_xla)
    assert got == precision and why in reason


@pytest.mark.parametrize("flag, amx_xla, precision, distribute, cpu, gpus, xla", [
    (None, True, None, "none", AMX, [], True),              # the rule's one case
    (None, True, None, "none", ["AVX512-BF16"], [], False),  # Zen 4: XLA measured slower
    (None, True, "bfloat16", "none", AMX, [], False),        # asked for 16 bits: no XLA unless --xla
    (None, True, None, "mirrored", AMX, [], False),          # XLA's variables on one device
    (None, True, None, "none", AMX, ["GPU:0"], False),       # a GPU: Keras' own choice
    (None, False, None, "none", AMX, [], False),             # NICE and Glow
    (False, True, None, "none", AMX, [], False),             # --no-xla
    (True, False, "bfloat16", "none", [], [], True),         # --xla
])
def test_choose_xla(flag, amx_xla, precision, distribute, cpu, gpus, xla):
    got, why = choose_xla(flag, amx_xla, precision, distribute, cpu_bf16=cpu, gpus=gpus)
    assert got is xla and (why is not None) == (xla and flag is None)


@pytest.mark.parametrize("cpu, flags, policy, xla", [
    (AMX, [], "float32", True), (["AVX512-BF16"], [], "mixed_bfloat16", False),
    (AMX, ["--no-xla"], "float32", False), (AMX, ["--mixed-precision", "bfloat16"], "mixed_bfloat16", False),
])
def test_tarflow_chooses_precision_and_xla_from_the_cpu(monkeypatch, tmp_path, cpu, flags, policy, xla):
    import tarflow

    monkeypatch.setattr(flow_devices, "cpu_bfloat16", lambda: cpu)
    args = tarflow.parse_args([*flags, "--out", str(tmp_path / "out"), "--weights", str(tmp_path / "w.weights.h5")])
    try:
        flow_cli.start(args)
        got = keras.config.dtype_policy().name
    finally:
        set_mixed_precision(None)
    if tf.config.list_physical_devices("GPU"):  # on a GPU: 16 bits only when asked, XLA left to Keras
        policy, xla = ("mixed_bfloat16" if "--mixed-precision" in flags else "float32"), False
        assert "--mixed-precision" in flags or "on a GPU 16 bits is opt-in" in args.precision_why
    assert (got, args.xla) == (policy, xla)
    assert ("XLA on" in args.precision_why) == (xla and "--no-xla" not in flags)


@pytest.mark.parametrize("script", [nice, glow])
@pytest.mark.parametrize("cpu", [["AVX512-BF16"], []])
def test_each_script_chooses_its_precision_at_start(monkeypatch, tmp_path, script, cpu):
    monkeypatch.setattr(flow_devices, "cpu_bfloat16", lambda: cpu)
    args = script.parse_args(["--out", str(tmp_path / "out"), "--weights", str(tmp_path / "w.weights.h5")])
    try:
        flow_cli.start(args)
        policy = keras.config.dtype_policy().name
    finally:
        set_mixed_precision(None)
    bf16 = script.BF16_DEFAULT and bool(cpu) and not tf.config.list_physical_devices("GPU")
    assert policy == ("mixed_bfloat16" if bf16 else "float32")
    assert args.precision_why == choose_precision(None, script.BF16_DEFAULT, cpu, [])[1]


@pytest.mark.parametrize("script", [nice, glow])
def test_modes_that_only_load_weights_stay_float32(monkeypatch, tmp_path, script):
    """Sampling, --reconstruct and the experiments keep float32 on a bfloat16 CPU (what `parse` marks
    as loads_weights; set here without a weights file)."""
    monkeypatch.setattr(flow_devices, "cpu_bfloat16", lambda: ["AVX512-BF16"])
    args = script.parse_args(["--out", str(tmp_path / "out"), "--weights", str(tmp_path / "w.weights.h5")])
    args.loads_weights = True
    try:
        flow_cli.start(args)
        assert keras.config.dtype_policy().name == "float32"
    finally:
        set_mixed_precision(None)
    assert args.mixed_precision is None


def test_training_prints_the_precision_once_and_none_forces_float32(monkeypatch, capsys, tmp_path, digits):
    from helpers import mnist_npz

    monkeypatch.setattr(flow_devices, "cpu_bfloat16", lambda: ["AVX512-BF16"])
    npz = mnist_npz(tmp_path / "m.npz", digits, 100, 50)
    try:
        assert nice.main(["--data", npz, "--epochs", "1", "--batch-size", "50", "--hidden", "8", "--hidden-layers", "1",
                          "--couplings", "2", "--mixed-precision", "none", "--weights", str(tmp_path / "w.weights.h5"),
                          "--out", str(tmp_path / "out")]) == 0
    finally:
        set_mixed_precision(None)
    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if line.startswith("precision")]
    assert lines == ["precision: float32 (--mixed-precision none)"]
    start = out.index(lines[0])  # the backend line just before it, once
    assert out[start - 1] == backend.describe() and out[start - 1].startswith(f"backend: {keras.backend.backend()} (")
    assert sum(line.startswith("backend: ") for line in out) == 1


def run_adam(cls, steps=5, **kwargs):
    """The weights after `steps` steps of `cls` on seeded gradients, then every optimizer variable
    (iterations, learning rate, each weight's first and second moments: public `variables`)."""
    rng = np.random.RandomState(0)
    variables = [keras.Variable(rng.standard_normal((30, 20)).astype("float32"), name="kernel"),
                 keras.Variable(rng.standard_normal((7,)).astype("float32"), name="bias")]
    opt = cls(1e-2, **kwargs)
    opt.build(variables)
    step = tf.function(lambda grads: opt.apply(grads, variables))
    for _ in range(steps):
        step([tf.constant(rng.standard_normal(v.shape).astype("float32")) for v in variables])
    return [v.numpy() for v in variables] + [v.numpy() for v in opt.variables]


def assert_same(ours, theirs):
    assert [a.shape for a in ours] == [b.shape for b in theirs]
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fused_adam_updates_exactly_as_keras_adam():
    """flowkit.optim.Adam swaps Keras' element-wise update for TensorFlow's fused kernel; the numbers (weights,
    first and second moments after 5 steps) are Keras' to float32 rounding, and its variables are
    Keras Adam's, in the same order (a weights file of one loads into the other)."""
    ours, theirs = run_adam(Adam), run_adam(keras.optimizers.Adam)
    assert [a.shape for a in ours] == [b.shape for b in theirs] and len(ours) == 2 + 2 + 2 * 2
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    moved = run_adam(Adam, steps=1)[0] - run_adam(Adam, steps=0)[0]
    assert np.abs(moved).max() > 1e-3  # it does update
    for cls in (Adam, AdamW):  # and through the fused kernel, one per variable
        variable = keras.Variable(np.ones(4, "float32"))
        opt = cls(0.1)
        opt.build([variable])
        graph = tf.function(lambda g: opt.apply([g], [variable])).get_concrete_function(tf.ones(4)).graph
        assert [op.type for op in graph.get_operations()].count("ResourceApplyAdam") == 1, cls


def test_fused_adamw_updates_as_keras_adamw():
    """flowkit.optim.AdamW (TarFlow's settings: β₂ 0.95, a large decay to make it count, the gradient clipped
    to global norm 1) gives Keras AdamW's weights and moments after 5 steps, to float32 rounding; a
    variable excluded by name is not decayed, as in Keras; with use_ema the weights' averages match too;
    and the decay does act (without it the weights differ)."""
    settings = dict(beta_1=0.9, beta_2=0.95, weight_decay=0.5, global_clipnorm=1.0)
    ours = run_adam(AdamW, **settings)
    assert_same(ours, run_adam(keras.optimizers.AdamW, **settings))
    ema = {**settings, "use_ema": True, "ema_momentum": 0.5}  # Keras' moving average of the weights, as in Keras
    assert_same(run_adam(AdamW, **ema), run_adam(keras.optimizers.AdamW, **ema))
    assert len(run_adam(AdamW, **ema)) == len(ours) + 2  # the two weights' averages
    no_decay = run_adam(AdamW, **{**settings, "weight_decay": 0.0})
    assert np.abs(no_decay[0] - ours[0]).max() > 1e-3
    assert AdamW.from_config(AdamW(**settings).get_config()).decay == 0.5

    class Excluding(AdamW):  # exclude_from_weight_decay, as a script calls it before the build
        def build(self, var_list):
            self.exclude_from_weight_decay(var_names=["bias"])
            super().build(var_list)

    class KerasExcluding(keras.optimizers.AdamW):
        def build(self, var_list):
            self.exclude_from_weight_decay(var_names=["bias"])
            super().build(var_list)

    ours = run_adam(Excluding, **settings)
    assert_same(ours, run_adam(KerasExcluding, **settings))
    np.testing.assert_allclose(ours[0], run_adam(AdamW, **settings)[0], rtol=1e-6)  # the kernel still decays
    assert np.abs(ours[1] - run_adam(AdamW, **settings)[1]).max() > 1e-4  # the bias does not


def test_fused_adam_is_keras_adam_under_a_strategy():
    """Under a tf.distribute strategy the mirrored variables go through Keras' element-wise formula."""
    strategy = make_strategy("mirrored", "CPU:0")
    with strategy.scope():
        variable = keras.Variable(np.ones(4, "float32"))
        opt = Adam(0.1)
        opt.build([variable])

    @tf.function
    def step():
        strategy.run(lambda: opt.apply([tf.ones(4)], [variable]))
    step()
    np.testing.assert_allclose(variable.numpy(), 0.9, rtol=1e-5)  # Adam's first step: lr · sign(g)


@pytest.mark.parametrize("flags, jit", [([], False), (["--xla"], True)])
def test_xla_flag_compiles_the_training_step(flags, jit, tmp_path):
    """--xla (every script's run flag) sets jit_compile on the model Run trains; without it Keras'
    "auto" leaves a CPU-only run without XLA (bench.py measured it slower here)."""
    args = nice.parse_args([*flags, "--weights", str(tmp_path / "n.weights.h5"), "--hidden", "8", "--out",
                            str(tmp_path / "out"), "--hidden-layers", "1", "--couplings", "2", "--mixed-precision", "none"])
    strategy = flow_cli.start(args)
    encoder, _, _ = nice.build_nice(hidden=8, hidden_layers=1, couplings=2)
    nice.compile_nice(encoder)
    Run(encoder, flow_cli.run_settings(args), strategy)
    if not tf.config.list_physical_devices("GPU"):
        assert encoder.jit_compile is jit
    x = nice.train_inputs(np.random.RandomState(0).randint(0, 256, (8, 28, 28)))
    assert np.isfinite(encoder.fit(x, x, batch_size=4, epochs=1, verbose=0).history["loss"][-1])
