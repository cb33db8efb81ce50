"""bench.py --quick runs end to end and writes the JSON it promises for all five models: every figure
present, positive and finite, each model's default variant the one its script would train with; two
backends side by side in one table; the GPU check under JAX without TensorFlow. No timing thresholds
(docs/design.md §4): how fast is the benchmark's business, not the tests'."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("nice", "glow", "tarflow", "fvae", "iresnet")
MODEL_KEYS = ("img_per_s", "utilisation", "first_step_s", "cpu_speedup_vs_fp32", "peak_rss_mib",
              "train_mflop_per_image", "parameters")
SAMPLE_KEYS = ("sample_grid_s", "sample_first_s", "sample_img_per_s")
VARIANT_KEYS = ("img_per_s", "step_s", "cpu_step_s", "utilisation", "utilisation_bf16_peak", "utilisation_own_peak",
                "utilisation_shape_peak", "first_step_s", "speedup_vs_fp32", "cpu_speedup_vs_fp32")


def positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One `bench.py --quick --backends tensorflow` run, its quality runs on 256 + 64 real digits (no
    download): in this process through bench.main where Keras runs on TensorFlow here (a fresh process
    would only add TensorFlow's import), else in its own process with KERAS_BACKEND=tensorflow."""
    import contextlib
    import io

    import keras

    from helpers import mnist_digits, mnist_npz

    folder = tmp_path_factory.mktemp("bench")
    out, data = folder / "bench.json", mnist_npz(folder / "mnist.npz", mnist_digits(), 256, 64)
    argv = ["--quick", "--backends", "tensorflow", "--data", str(data), "--json", str(out)]
    if keras.backend.backend() != "tensorflow":
        run = subprocess.run([sys.executable, "-m", "tools.bench", *argv], cwd=ROOT, capture_output=True, text=True,
                             timeout=600, env={**os.environ, "KERAS_BACKEND": "tensorflow"})
        assert run.returncode == 0, run.stderr[-2000:]
        return json.loads(out.read_text()), run.stdout
    import tools.bench as bench

    stdout, saved = io.StringIO(), os.environ.get("KERAS_BACKEND")
    os.environ["KERAS_BACKEND"] = "tensorflow"  # main runs the bench in this process for that backend only
    try:
        with contextlib.redirect_stdout(stdout):
            assert bench.main(argv) == 0
    finally:
        if saved is None:
            del os.environ["KERAS_BACKEND"]
        else:
            os.environ["KERAS_BACKEND"] = saved
        keras.config.set_dtype_policy(keras.config.floatx())
    return json.loads(out.read_text()), stdout.getvalue()


def test_quick_bench_writes_every_figure(quick):
    r, stdout = quick
    assert [m["dtype"] for m in r["matmul"]] == ["float32", "float32", "bfloat16", "bfloat16"]
    assert all(positive(m["gflops"]) for m in r["matmul"])
    assert positive(r["peak_rss_mib"]) and positive(r["total_s"])
    assert r["models"] == list(MODELS)
    for model in MODELS:
        m = r[model]
        for key in MODEL_KEYS + (SAMPLE_KEYS if model in ("nice", "glow", "fvae") else ()):
            assert positive(m[key]), (model, key, m.get(key))
        assert m["train_mflop_per_image"] == pytest.approx(3 * m["forward_mflop_per_image"])
        assert {"fp32", "bf16"} <= set(m["variants"])  # --quick: the two without an XLA compile, and
        assert {m["default_variant"], m["fp32_default_variant"]} <= set(m["variants"])  # the defaults
        assert [n for n, v in m["variants"].items() if v["is_default"]] == [m["default_variant"]]
        assert m["fp32_default_variant"].startswith("fp32")
        assert m["utilisation"] == m["variants"][m["fp32_default_variant"]]["utilisation"]
        assert m["img_per_s"] == m["variants"][m["default_variant"]]["img_per_s"]
        sp = m["shape_peak"]  # the peak at the model's own matmul shapes, in both dtypes
        assert 1 <= len(sp["shapes"]) <= 3 and 0 < sp["flop_share_timed"] <= 1 + 1e-9
        assert all(positive(g) for s in sp["shapes"] for g in s["gflops"].values())
        assert all(positive(m["shape_peak_img_per_s"][p]) for p in ("none", "bfloat16"))
        for name, v in m["variants"].items():
            for key in VARIANT_KEYS:
                assert positive(v[key]), (model, name, key, v.get(key))
            assert v["loss_finite"] is True
            assert v["waiting_step_s"] >= 0  # thread-seconds runnable but waiting for a core
            for ratio, (lo, hi) in ((v["speedup_vs_fp32"], v["speedup_spread"]),
                                    (v["cpu_speedup_vs_fp32"], v["cpu_speedup_spread"])):
                assert lo <= ratio <= hi
            assert v["utilisation_bf16_peak"] == pytest.approx(v["utilisation"] * r["matmul"][0]["gflops"]
                                                               / r["matmul"][2]["gflops"])
        assert m["variants"]["fp32"]["speedup_vs_fp32"] == 1 == m["variants"]["fp32"]["cpu_speedup_vs_fp32"]
        assert m["variants"]["bf16"]["mixed_precision"] == "bfloat16"
    for model in ("nice", "glow", "tarflow"):
        q = r[model]["quality"]  # test bits/dim at equal steps, per variant, and the difference to fp32
        assert {"fp32", "bf16"} <= set(q["test_bpd"]) and all(positive(b) for b in q["test_bpd"].values())
        assert q["minus_fp32"]["bf16"] == q["test_bpd"]["bf16"] - q["test_bpd"]["fp32"]
    assert "glow_64" not in r  # --quick never runs the article's 64² Glow
    assert "utilisation" in stdout and "peak at its own matmul shapes" in stdout  # the table is printed too
    assert r["backend"] == "tensorflow" and stdout.startswith("backend: tensorflow")
    rows = {(row["model"], row["variant"]): row for row in r["rows"]}  # one per model × variant, its backend named
    assert set(rows) == {(model, name) for model in MODELS for name in r[model]["variants"]}
    for (model, name), row in rows.items():
        assert row["backend"] == "tensorflow" and positive(row["cores"])
        assert row["img_per_s"] == r[model]["variants"][name]["img_per_s"]


def test_default_variant_is_the_scripts_choice(quick):
    """The precision each script trains with by default on this machine (choose_precision with the
    script's bf16_default), and XLA as NICE's compile picks it for a long float32 run."""
    import fvae
    import glow
    import iresnet
    import nice
    import tarflow
    from flowkit.devices import choose_precision, choose_xla

    from flowkit import backend

    r, _ = quick
    for name, module in (("nice", nice), ("glow", glow), ("tarflow", tarflow), ("fvae", fvae), ("iresnet", iresnet)):
        parsed = module.parse_args([])
        precision = choose_precision(None, parsed.bf16_default, amx_xla=parsed.amx_xla)[0]
        assert r[name]["default_variant"].startswith("bf16" if precision else "fp32"), name
    if not backend.accelerators():  # Keras' "auto": no XLA on TensorFlow's CPU, but the AMX rule
        for name, module in (("nice", nice), ("glow", glow), ("tarflow", tarflow), ("fvae", fvae), ("iresnet", iresnet)):
            xla = choose_xla(None, module.parse_args([]).amx_xla, None)[0]
            assert r[name]["fp32_default_variant"] == ("fp32_xla" if xla else "fp32"), name


def test_models_flag_picks_a_subset():
    import tools.bench as bench

    assert bench.parse_args(["--models", "tarflow,fvae"]).models == ["tarflow", "fvae"]
    assert bench.parse_args(["--skip-glow"]).models == ["nice", "tarflow", "fvae", "iresnet"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--models", "nice,realnvp"])


def test_backends_flag_defaults_to_the_installed_ones(capsys):
    import importlib.util

    import tools.bench as bench

    import tools.measure as measure

    assert bench.VARIANT_NAMES == tuple(n for n, _, _ in measure.VARIANTS)  # --variants' default, without Keras
    installed = [b for b in ("tensorflow", "jax", "torch") if importlib.util.find_spec(b)]
    assert bench.parse_args([]).backends == installed and "tensorflow" in installed
    assert bench.parse_args(["--backends", "tensorflow"]).backends == ["tensorflow"]
    for bad in (["--backends", "theano"], ["--backends", "tensorflow", "--gpu-check"], ["--backends", ""]):
        with pytest.raises(SystemExit) as e:
            bench.parse_args(bad)
        assert e.value.code == 2
        assert "error: --backends" in capsys.readouterr().err.strip().splitlines()[-1]


def test_two_backends_side_by_side_in_one_table(tmp_path):
    """`--backends tensorflow,jax`: each backend in its own process, then one table with a row per
    backend × variant (img/s, cores) and one JSON whose rows name their backend; on JAX every step is
    jitted (tools.measure.variants_here)."""
    pytest.importorskip("jax")
    out = tmp_path / "side.json"
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    run = subprocess.run([sys.executable, "-m", "tools.bench", "--quick", "--backends", "tensorflow,jax", "--models",
                          "nice", "--quality-steps", "0", "0", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["backends"] == ["tensorflow", "jax"] and set(r["runs"]) == {"tensorflow", "jax"} and r["failed"] == {}
    rows = {(row["backend"], row["variant"]): row for row in r["rows"]}
    assert set(rows) == {("tensorflow", "fp32"), ("tensorflow", "bf16"), ("jax", "fp32"), ("jax", "bf16")}
    for (name, variant), row in rows.items():
        assert row["model"] == "nice" and positive(row["img_per_s"]) and positive(row["cores"])
        assert row["jit_compile"] is (name == "jax")
        assert row["img_per_s"] == r["runs"][name]["nice"]["variants"][variant]["img_per_s"]
    table = run.stdout[run.stdout.index("model × backend × variant"):].splitlines()
    assert table[1].split() == ["model", "backend", "variant", "step", "img/s", "cores", "first", "step"]
    lines = [line.split() for line in table[2:] if line.startswith("NICE")]
    assert [(w[1], w[2]) for w in lines] == [("tensorflow", "fp32"), ("tensorflow", "bf16"), ("jax", "fp32"),
                                             ("jax", "bf16")]
    assert all(float(w[-4]) == pytest.approx(rows[(w[1], w[2])]["img_per_s"], abs=0.06) for w in lines)
    assert run.stdout.count("model × backend × variant") == 1  # the runs' own tables stay with the parent's


def test_nice_flops_are_counted_from_the_layer_shapes():
    import tools.measure as flow_bench
    import nice

    encoder, _, _ = nice.build_nice(hidden=10, hidden_layers=2, couplings=3)
    per_coupling = 2 * (392 * 10 + 10 * 10 + 10 * 392)  # Dense kernels of m, 2 FLOPs per multiply-add
    assert flow_bench.forward_flops(encoder) == 3 * per_coupling
    shapes = flow_bench.kernel_shapes(encoder, batch=8)  # FLOP shares of the matmul shapes at batch 8
    assert shapes == pytest.approx({(8, 392, 10): 3920 / 7940, (8, 10, 10): 100 / 7940, (8, 10, 392): 3920 / 7940})


def test_glow_flops_are_counted_at_each_level_spatial_size():
    import tools.measure as flow_bench
    import glow

    encoder, _ = glow.build_glow(4, 1, level=1, depth=1, hidden=4)
    # after the squeeze: 2×2 pixels, 4 channels, the coupling net sees 2 of them
    net = 2 * (3 * 3 * 2 * 4 + 4 * 4 + 3 * 3 * 4 * 2)  # conv3×3 2→4, conv1×1 4→4, conv3×3 4→2
    assert flow_bench.forward_flops(encoder) == net * 2 * 2
    assert (2 * 2, 3 * 3 * 2, 4) in flow_bench.kernel_shapes(encoder, batch=1)  # a 3×3 conv as its im2col matmul


def test_tarflow_flops_count_every_dense_per_token_and_the_attention():
    import tools.measure as flow_bench
    import tarflow

    encoder, _, _ = tarflow.build_tarflow(img_size=4, channels=1, patch=2, width=4, blocks=1, layers=1, heads=2)
    # 4 tokens of 4: proj_in 4→4, qkv 4→12, attention_out 4→4, mlp 4→16→4, proj_out 4→8 per token
    dense = 2 * (16 + 48 + 16 + 64 + 64 + 32) * 4
    attention = 2 * 2 * 4 ** 2 * 4  # QKᵀ and AV: 2·T²·width each
    assert flow_bench.forward_flops(encoder) == dense + attention


def test_iresnet_flops_count_the_log_det_series():
    import tools.measure as flow_bench
    import iresnet

    encoder, _, _ = iresnet.build_iresnet((4, 4, 1), stages=1, blocks=1, width=2, terms=3)
    # after the squeeze 2×2×4; g: conv3×3 4→2, conv1×1 2→2, conv3×3 2→4; 1 + 3 passes (3 VJPs)
    g = 2 * (9 * 4 * 2 + 2 * 2 + 9 * 2 * 4) * 2 * 2
    assert flow_bench.forward_flops(encoder) == g * (1 + 3)


@pytest.mark.parametrize("precision", [None, "bfloat16"])
def test_tarflow_profile_times_every_part(precision):
    """`bench.py --profile tarflow` on the quick configuration: the step, its update and every part of
    the Transformer timed (positive), the parts within forward + backward, the data pipeline's batch."""
    import tools.bench as bench
    import tools.measure as flow_bench

    assert bench.parse_args(["--profile"]).profile == "nice" and bench.parse_args(["--profile", "tarflow"]).profile == "tarflow"
    r = flow_bench.profile_tarflow(bench.QUICK["tarflow"], repeats=1, precision=precision)
    assert set(r["parts_s"]) == {"layer norms", "QKV and output projections", "attention core", "MLP Dense layers", "GELU"}
    assert all(positive(r[k]) for k in ("step_s", "forward_backward_s", "adamw_update_s", "data_batch_s"))
    assert all(positive(v) for v in r["parts_s"].values())
    assert math.isclose(r["rest_s"], r["forward_backward_s"] - sum(r["parts_s"].values()))


def test_tarflow_cache_times_sampling_with_and_without_it(capsys):
    """`bench.py --tarflow-cache N --quick` (tarflow.py's former --speed): one line with both ways' rates
    and tracing times, and the two ways decode the same images; run on KERAS_BACKEND's backend alone."""
    import re

    import tools.bench as bench

    assert bench.main(["--tarflow-cache", "3", "--quick"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    found = re.fullmatch(r"sampling 3 images \(--img-size 8, --patch 4, .*\), compiled: ([\d.]+) img/s with the "
                         r"key-value cache, ([\d.]+) img/s without \(×[\d.]+\); first calls \(tracing\) [\d.]+ s "
                         r"and [\d.]+ s; largest difference between the two ([\d.e+-]+)", line)
    assert found, line
    assert positive(float(found[1])) and positive(float(found[2])) and float(found[3]) < 1e-4
    for bad in (["--tarflow-cache", "2", "--backends", "tensorflow"], ["--tarflow-cache", "-1"]):
        with pytest.raises(SystemExit) as e:
            bench.parse_args(bad)
        assert e.value.code == 2


_GPU_CHECK_WITHOUT_TENSORFLOW = """
import sys
sys.modules["tensorflow"] = None  # as if TensorFlow were not installed
from tools.bench import main
code = main(sys.argv[1:])
print("tensorflow loaded:", sys.modules.get("tensorflow") is not None)
sys.exit(code)
"""


def test_gpu_check_under_jax_without_tensorflow_runs_every_model_and_the_loss_falls(tmp_path):
    """`KERAS_BACKEND=jax bench --gpu-check --quick` (tiny sizes) in a process where TensorFlow cannot
    be imported: every model, TarFlow at the notebook size too, with its figures; the float32 training
    loss falls over its few dozen steps (epoch means); jitted, as every JAX step is."""
    from tools.gpu_check import TINY

    pytest.importorskip("jax")
    out = tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, "-c", _GPU_CHECK_WITHOUT_TENSORFLOW, "--gpu-check", "--quick", "--variants",
                          "fp32", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "KERAS_BACKEND": "jax"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.splitlines()[-1] == "tensorflow loaded: False"
    r = json.loads(out.read_text())
    assert r["backend"] == "jax" and r["precision"] == "bfloat16" and r["device"] and r["epochs"] >= 2
    assert list(r["models"]) == ["nice", "glow", "tarflow", "tarflow_notebook", "fvae", "iresnet"]
    for model, variants in r["models"].items():
        assert list(variants) == ["fp32"]
        v = variants["fp32"]
        assert all(positive(v[k]) for k in ("img_per_s", "step_s", "cpu_step_s", "cores", "first_step_s")), model
        assert v["img_per_s"] * v["step_s"] == pytest.approx(TINY[model]["batch"])  # img/s from the wall time
        assert v["cores"] == pytest.approx(v["cpu_step_s"] / v["step_s"])
        assert v["jit_compile"] is True and v["mixed_precision"] == "none"
        assert v["loss_fell"] is True, (model, v)
        line = next(line for line in run.stdout.splitlines() if line.startswith(f"{model} ") and " fp32 " in line)
        assert "img/s" in line and "cores" in line and "first step" in line and "(fell)" in line


def test_gpu_check_compiles_with_xla_when_asked():
    import tools.gpu_check as gpu

    r = gpu.gpu_check(quick=True, models=("nice",), variants=("fp32_xla",), steps=5, epochs=3)
    v = r["models"]["nice"]["fp32_xla"]
    assert v["jit_compile"] is True and positive(v["img_per_s"]) and v["loss_fell"]


def test_peers_says_one_line_when_the_scripts_are_not_there(tmp_path, capsys):
    import tools.bench as bench

    assert bench.peers(str(tmp_path / "compare.sh")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "compare.sh" in err[0]


def test_peers_repeats_end_with_the_medians(tmp_path, capsys):
    """--peers --repeats 3: the script's table each time, then per model the median img/s and ratio."""
    import tools.bench as bench

    script = tmp_path / "compare.sh"
    counter = tmp_path / "n"
    counter.write_text("0")
    script.write_text(f"""n=$(cat {counter}); n=$((n + 1)); echo $n > {counter}
awk -v n=$n 'BEGIN {{printf "tarflow  ours %7.1f img/s, peer best %7.1f img/s, ratio %.2f\\n", 100 * n, 200, n / 2}}'
""")
    assert bench.peers(str(script), repeats=3) == 0
    out = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("tarflow  ours") for line in out) == 3
    assert out[-1] == "tarflow  median of 3 runs: ours 200.0 img/s, peer best 200.0 img/s, ratio 1.00 (runs 0.50 to 1.50)"
