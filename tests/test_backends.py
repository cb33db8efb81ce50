"""Every Keras backend: the project imports on JAX with TensorFlow made unimportable; the committed
weights of all five models give the same decoder outputs and log-likelihoods on each backend
(tests/backend_probe.py run once per backend). Each backend runs in a subprocess: Keras picks its
backend once per process. The layer table on each backend: tests/test_backend_layers.py."""
import importlib.util
import os

import numpy as np
import pytest

from helpers import run_on_backend as run

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_JAX = importlib.util.find_spec("jax") is not None


def test_the_blocker_blocks_tensorflow(tmp_path):
    out = run("jax", ["-c", "import tensorflow"], str(tmp_path), block_tensorflow=True)
    assert out.returncode != 0 and "import of tensorflow halted" in out.stderr


@pytest.mark.skipif(not HAS_JAX, reason="jax is not installed (requirements.txt installs it)")
def test_the_project_imports_without_tensorflow_on_jax(tmp_path):
    code = ("import sys, flowkit, flow_layers, nice, glow, fvae, iresnet, tarflow, flowkit.data, flowkit.score;"
            "from flowkit import backend; print(backend.describe(), 'tensorflow' in sys.modules and "
            "sys.modules['tensorflow'] is not None)")
    out = run("jax", ["-c", code], str(tmp_path), block_tensorflow=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "backend: jax (CPU) False"


BACKENDS = ["tensorflow"] + (["jax"] if HAS_JAX else []) + (["torch"] if HAS_TORCH else [])


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    """{backend: the probe's arrays}, each backend in its own process (JAX without TensorFlow)."""
    found = {}
    for backend in BACKENDS:
        tmp = str(tmp_path_factory.mktemp(backend))
        path = os.path.join(tmp, "probe.npz")
        out = run(backend, ["tests/backend_probe.py", path], tmp, block_tensorflow=backend == "jax")
        assert out.returncode == 0, f"{backend}: {out.stderr[-3000:]}"
        with np.load(path) as f:
            found[backend] = {k: f[k] for k in f.files}
    return found


@pytest.mark.slow
@pytest.mark.parametrize("model", ["nice", "glow", "fvae", "iresnet", "tarflow"])
def test_one_weights_file_gives_the_same_numbers_on_every_backend(probes, model):
    """Same z -> same x from each backend's decoder; same x -> same z and log-likelihood from each
    backend's encoder, on the committed weights, at float32 tolerances."""
    reference = probes["tensorflow"]
    assert str(reference["backend"]) == "tensorflow"
    for backend in BACKENDS[1:]:
        other = probes[backend]
        assert str(other["backend"]) == backend
        for key in [k for k in reference if k.startswith(model + "/")]:
            a, b = reference[key], other[key]
            assert a.shape == b.shape, (backend, key)
            if key.endswith("nll"):  # nats per image, in the thousands: float32 sums
                np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-2, err_msg=f"{backend} {key}")
            else:
                np.testing.assert_allclose(b, a, rtol=1e-3, atol=2e-4 * max(1.0, np.abs(a).max()),
                                           err_msg=f"{backend} {key}")
        assert len([k for k in reference if k.startswith(model + "/")]) >= 2
