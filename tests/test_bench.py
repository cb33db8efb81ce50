"""bench.py --quick runs end to end and writes the JSON it promises: every figure present, positive
and finite. No timing thresholds (docs/design.md §4): how fast is the benchmark's business, not the tests'."""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODEL_KEYS = ("img_per_s", "utilisation", "first_step_s", "sample_grid_s", "sample_first_s",
              "sample_img_per_s", "peak_rss_mib")
VARIANT_KEYS = ("img_per_s", "step_s", "cpu_step_s", "utilisation", "utilisation_own_peak", "first_step_s",
                "speedup_vs_fp32", "cpu_speedup_vs_fp32")


def positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_bench_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "bench.py", "--quick", "--json", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads(out.read_text())
    assert [m["dtype"] for m in r["matmul"]] == ["float32", "float32", "bfloat16", "bfloat16"]
    assert all(positive(m["gflops"]) for m in r["matmul"])
    assert positive(r["peak_rss_mib"]) and positive(r["total_s"])
    assert r["nice"]["train_mflop_per_image"] == 3 * r["nice"]["forward_mflop_per_image"] > 0
    assert positive(r["glow"]["train_gflop_per_image"])
    for model in ("nice", "glow"):
        m = r[model]
        for key in MODEL_KEYS:
            assert positive(m[key]), (model, key, m.get(key))
        assert set(m["variants"]) == {"fp32", "bf16"}  # --quick: the two without an XLA compile
        assert m["default_variant"] in m["variants"] and m["fp32_default_variant"] == "fp32"
        assert m["utilisation"] == m["variants"]["fp32"]["utilisation"]  # the float32 default path's
        for name, v in m["variants"].items():
            for key in VARIANT_KEYS:
                assert positive(v[key]), (model, name, key, v.get(key))
            assert v["loss_finite"] is True
            lo, hi = v["speedup_spread"]
            assert lo <= v["speedup_vs_fp32"] <= hi
        assert m["variants"]["fp32"]["speedup_vs_fp32"] == 1
        assert m["variants"]["bf16"]["mixed_precision"] == "bfloat16"
        q = m["quality"]  # test bits/dim at equal steps, per variant, and the difference to fp32
        assert set(q["test_bpd"]) == {"fp32", "bf16"} and all(positive(b) for b in q["test_bpd"].values())
        assert q["minus_fp32"]["bf16"] == q["test_bpd"]["bf16"] - q["test_bpd"]["fp32"]
    assert "glow_64" not in r  # --quick never runs the article's 64² Glow
    assert "utilisation" in run.stdout  # the table is printed too


def test_nice_flops_are_counted_from_the_layer_shapes():
    import bench
    import nice

    encoder, _, _ = nice.build_nice(hidden=10, hidden_layers=2, couplings=3)
    per_coupling = 2 * (392 * 10 + 10 * 10 + 10 * 392)  # Dense kernels of m, 2 FLOPs per multiply-add
    assert bench.forward_flops(encoder) == 3 * per_coupling


def test_glow_flops_are_counted_at_each_level_spatial_size():
    import bench
    import glow

    encoder, _ = glow.build_glow(4, 1, level=1, depth=1, hidden=4)
    # after the squeeze: 2×2 pixels, 4 channels, the coupling net sees 2 of them
    net = 2 * (3 * 3 * 2 * 4 + 4 * 4 + 3 * 3 * 4 * 2)  # conv3×3 2→4, conv1×1 4→4, conv3×3 4→2
    assert bench.forward_flops(encoder) == net * 2 * 2
