"""Every Keras backend runs the layer table (tests/test_layers.py: round trips, log-dets against the
brute-force Jacobian in float64): on JAX with TensorFlow made unimportable, and on PyTorch where torch is
installed, each in its own process (Keras picks its backend once per process). A file of its own, so that
pytest-xdist runs it beside tests/test_backends.py's probes."""
import importlib.util

import pytest

from helpers import run_on_backend as run

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_JAX = importlib.util.find_spec("jax") is not None


def layer_table(backend, tmp, block_tensorflow):
    out = run(backend, ["-m", "pytest", "tests/test_layers.py", "-p", "no:cacheprovider", "-x", "-n", "0"], tmp,
              block_tensorflow=block_tensorflow)
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary
    return int(summary.split(" passed")[0].split()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not HAS_JAX, reason="jax is not installed (requirements.txt installs it)")
def test_layer_table_on_jax_without_tensorflow(tmp_path):
    assert layer_table("jax", str(tmp_path), block_tensorflow=True) > 300


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed (CI keeps without it: a multi-GB install)")
def test_layer_table_on_torch(tmp_path):
    assert layer_table("torch", str(tmp_path), block_tensorflow=False) > 300
