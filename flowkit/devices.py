"""Scaling out: the strategy of --distribute (tf.distribute on TensorFlow, keras.distribution's
DataParallel on JAX; and which process is the chief, where each process writes), and the precision of
--mixed-precision with the bfloat16 default on CPUs that have the instructions."""
import contextlib
import json
import os
import tempfile

import keras

from flowkit import backend
from flowkit.files import UserError

DISTRIBUTE = ("none", "mirrored", "multiworker")
PRECISIONS = {"bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def add_scale_out_args(parser):
    """--distribute, --devices and --mixed-precision, the same in every script."""
    parser.add_argument("--distribute", choices=DISTRIBUTE, default="none",
                        help="data-parallel training: mirrored = all local GPUs (or --devices; on JAX "
                             "keras.distribution.DataParallel), multiworker = every host named in the TF_CONFIG "
                             "environment variable (TensorFlow only); not on PyTorch; "
                             "--batch-size is the global batch, split over the replicas")
    parser.add_argument("--devices", default=None, metavar="LIST",
                        help="with --distribute mirrored: comma-separated devices, e.g. GPU:0,GPU:1 "
                             "(default: every local GPU, else the CPU)")
    parser.add_argument("--mixed-precision", nargs="?", const="bfloat16", default=None,
                        choices=(*PRECISIONS, "none"),
                        help="coupling networks compute in 16 bits (bfloat16 if no value: CPUs, TPUs, "
                             "Ampere+ GPUs; float16 for older GPUs, with dynamic loss scaling); "
                             "variables, the flow's data path, log-dets and the loss stay float32. "
                             "none: float32 throughout. Default: the script's choice, printed at start "
                             "(NICE, Glow and TarFlow training: mixed bfloat16 on a CPU with bfloat16 instructions, else float32; "
                             "TarFlow on a CPU with AMX: float32 with XLA, flowkit.devices.choose_xla)")


_strategies = {}  # one per (name, devices) and process: two in one process clash in their collectives


class LocalStrategy:
    """The strategy of a run off TensorFlow: one process, `scope()` does nothing. With a
    keras.distribution (JAX's --distribute mirrored: DataParallel, set globally by make_strategy)
    Keras itself replicates the variables and splits fit's batches over its devices."""

    def __init__(self, distribution=None):
        self.distribution = distribution
        self.num_replicas_in_sync = len(distribution.device_mesh.devices.flatten()) if distribution else 1

    def scope(self):
        return contextlib.nullcontext()


def make_strategy(name="none", devices=None):
    """The strategy for --distribute, the one place every script gets it from. Call it before any
    other TensorFlow work: MultiWorkerMirroredStrategy must be created at program start.

    none: one device (TensorFlow's default strategy; elsewhere a LocalStrategy); mirrored: all local
    devices, or `devices` (a list or "GPU:0,GPU:1"), default every local GPU, else the CPU: TensorFlow's
    MirroredStrategy, JAX's keras.distribution.DataParallel; multiworker (TensorFlow only):
    MultiWorkerMirroredStrategy, the cluster and this process's role read from TF_CONFIG. Build,
    compile and initialise the model inside `strategy.scope()`; fit's batch is the global batch.
    """
    if name not in DISTRIBUTE:
        raise UserError(f"--distribute {name}: expected one of {', '.join(DISTRIBUTE)}")
    if devices and name != "mirrored":
        raise UserError("--devices goes with --distribute mirrored")
    if isinstance(devices, str):
        devices = [d.strip() for d in devices.split(",") if d.strip()]
    if backend.name() != "tensorflow":
        return _local_strategy(name, devices)
    import tensorflow as tf

    if name == "none":
        return tf.distribute.get_strategy()
    key = (name, tuple(devices or ()))
    if key not in _strategies:
        _strategies[key] = _new_strategy(tf, name, devices)
    return _strategies[key]


def _local_strategy(name, devices):
    """make_strategy off TensorFlow: JAX's DataParallel for mirrored (set as Keras' distribution),
    a one-line error for what the backend cannot do."""
    ours = set(_strategies.values())
    if name == "none":
        if keras.distribution.distribution() in {s.distribution for s in ours}:
            keras.distribution.set_distribution(None)  # an earlier --distribute mirrored of this process
        return LocalStrategy()
    if backend.name() != "jax":
        raise UserError(f"--distribute: not available on the {backend.name()} backend (KERAS_BACKEND="
                        f"{backend.name()}); data-parallel training runs on the tensorflow and jax backends")
    if name == "multiworker":
        raise UserError("--distribute multiworker: not available on the jax backend (TF_CONFIG clusters are "
                        "TensorFlow's); --distribute mirrored splits the batch over this host's devices")
    key = (name, tuple(devices or ()))
    if key not in _strategies:
        known = keras.distribution.list_devices()
        chosen = known
        if devices:
            unknown = [d for d in devices if d.lower() not in known]
            if unknown:
                raise UserError(f"--devices: no such device {', '.join(unknown)} "
                                f"(this machine has {', '.join(d.upper() for d in known)})")
            chosen = [d.lower() for d in devices]
        _strategies[key] = LocalStrategy(keras.distribution.DataParallel(devices=chosen))
    keras.distribution.set_distribution(_strategies[key].distribution)
    return _strategies[key]


def _new_strategy(tf, name, devices):
    if name == "mirrored":
        if devices:
            known = {d.name.split("device:")[-1].upper() for d in tf.config.list_logical_devices()}
            unknown = [d for d in devices if d.split("device:")[-1].lstrip("/").upper() not in known]
            if unknown:
                raise UserError(f"--devices: no such device {', '.join(unknown)} "
                                f"(this machine has {', '.join(sorted(known))})")
        return tf.distribute.MirroredStrategy(devices or None)
    config = os.environ.get("TF_CONFIG")
    if not config:
        raise UserError("--distribute multiworker: set TF_CONFIG, e.g. "
                        "'{\"cluster\": {\"worker\": [\"host1:12345\", \"host2:12345\"]}, "
                        "\"task\": {\"type\": \"worker\", \"index\": 0}}' (index 1 on the second host)")
    try:
        json.loads(config)
    except ValueError:
        raise UserError(f"TF_CONFIG is not JSON: {config[:80]!r}") from None

    class MultiWorker(tf.distribute.MultiWorkerMirroredStrategy):
        """Works around the two reductions by which Keras 3.15's fit fails on more than one worker
        (keras-team/keras#20585): it reduces the first (x, y) batch as one tuple, which this strategy
        rejects ('Attempt to convert a value (PerReplica...)') where MirroredStrategy reduces element
        by element; and it reduces each step's scalar logs with axis=0 ('Invalid reduction dimension
        0 for input with 0 dimensions'), where the mean across replicas is meant."""

        def reduce(self, reduce_op, value, axis):
            if isinstance(value, (tuple, list)):
                return type(value)(self.reduce(reduce_op, v, axis) for v in value)
            if axis is not None and all(t.shape.rank == 0 for t in self.experimental_local_results(value)):
                axis = None
            return super().reduce(reduce_op, value, axis)

    return MultiWorker()


BF16_FLAGS = (("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16"))


def cpu_bfloat16(cpuinfo="/proc/cpuinfo"):
    """The bfloat16 instruction sets the CPU lists (Linux /proc/cpuinfo flags), e.g. ["AVX512-BF16",
    "AMX-BF16"]; [] without them or without the file (other systems: float32 stays the default)."""
    try:
        with open(cpuinfo) as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return []
    return [name for flag, name in BF16_FLAGS if flag in flags]


def cpu_model(cpuinfo="/proc/cpuinfo"):
    """The CPU's name as Linux lists it ("model name"), else platform's machine name (e.g. "x86_64")."""
    import platform
    try:
        with open(cpuinfo) as f:
            line = next((line for line in f if line.startswith("model name")), "")
    except OSError:
        line = ""
    return line.partition(":")[2].strip() or platform.processor() or platform.machine()


def _gpus(gpus):
    if gpus is None:
        gpus = [d for d in backend.accelerators() if d.startswith("GPU")]
    return gpus


def compiles_with_xla():
    """Whether the backend's compiled training step is an XLA program: TensorFlow's with jit_compile,
    JAX's always. PyTorch's jit_compile is torch.compile, which the AMX measurements behind `amx_xla`
    (choose_precision, choose_xla) did not cover: there a model keeps the plain bfloat16 default."""
    return backend.name() in ("tensorflow", "jax")


def choose_precision(flag, bf16_default, cpu_bf16=None, gpus=None, amx_xla=False):
    """(precision for `set_mixed_precision`, why) from --mixed-precision: an explicit value wins ("none"
    is float32); unset, a model whose default is bfloat16 gets it on a CPU-only machine whose CPU has
    bfloat16 instructions (oneDNN runs them at about twice the float32 matmul rate), float32 elsewhere:
    on a GPU 16 bits stays the user's choice. A model with `amx_xla` keeps float32 on a CPU with AMX, where
    its float32 step with XLA is the faster one (`choose_xla`). cpu_bf16 and gpus: detected when None
    (tests force them)."""
    if flag == "none":
        return None, "--mixed-precision none"
    if flag:
        return flag, f"--mixed-precision {flag}"
    if not bf16_default:
        return None, "this model's default; --mixed-precision bfloat16 to try 16 bits"
    if _gpus(gpus):
        return None, "on a GPU 16 bits is opt-in: --mixed-precision"
    cpu_bf16 = cpu_bfloat16() if cpu_bf16 is None else cpu_bf16
    if amx_xla and "AMX-BF16" in cpu_bf16:
        return None, "CPU has AMX-BF16, where this model's float32 step with XLA beats bfloat16; --mixed-precision bfloat16 for 16 bits"
    if cpu_bf16:
        return "bfloat16", f"CPU has {', '.join(cpu_bf16)}; --mixed-precision none for float32"
    return None, "CPU has no bfloat16 instructions"


def choose_xla(flag, amx_xla, precision, distribute="none", cpu_bf16=None, gpus=None):
    """(jit_compile for the training step, why or None) from --xla/--no-xla: an explicit one wins; unset,
    XLA compiles a float32 step of a model with `amx_xla` on one device of a CPU with AMX-BF16 (measured
    on an Intel Xeon: TarFlow's float32 step ×1.41 less CPU with XLA, its bfloat16 one ×1.07 faster than
    float32 without), and nothing else: on AMD Zen 4 (AVX512-BF16, no AMX) XLA slowed every model's
    default path (docs/running.md), and on a GPU Keras compiles with XLA anyway. Only on TensorFlow: JAX
    compiles every step with XLA, and PyTorch's jit_compile is torch.compile (minutes of compiling)."""
    if flag is not None:
        return bool(flag), None
    if backend.name() != "tensorflow":  # the rule was measured on TensorFlow; on torch jit_compile is torch.compile
        return False, None
    if not amx_xla or precision is not None or distribute != "none" or _gpus(gpus):
        return False, None
    if "AMX-BF16" in (cpu_bfloat16() if cpu_bf16 is None else cpu_bf16):
        return True, "XLA on: this model's float32 step is faster with it on AMX; --no-xla to leave it off"
    return False, None


def set_mixed_precision(name=None):
    """Keras' global dtype policy: "mixed_bfloat16"/"mixed_float16" for name bfloat16/float16, the
    default float32 for None. Set it before building a model. The flow layers keep float32 (their data
    path and log-dets); compile wraps the optimizer in a LossScaleOptimizer under mixed_float16."""
    if name is not None and name not in PRECISIONS:
        raise UserError(f"--mixed-precision {name}: expected one of {', '.join(PRECISIONS)}")
    keras.mixed_precision.set_global_policy(PRECISIONS[name] if name else keras.config.floatx())


def is_chief(strategy):
    """True unless this process is a worker other than the chief of a multi-worker strategy (the
    chief: task type "chief", else worker 0, as TensorFlow decides). Off TensorFlow a run is one process."""
    if backend.name() != "tensorflow":
        return True
    import tensorflow as tf

    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    resolver = strategy.cluster_resolver
    if resolver.task_type in (None, "chief"):
        return True
    return (resolver.task_type == "worker" and resolver.task_id == 0
            and "chief" not in resolver.cluster_spec().as_dict())


_worker_folder = None


def worker_path(path, strategy):
    """Where this process writes `path` (a file or a folder): `path` itself on the chief; on the other
    workers the same name in a private temporary folder, removed at exit (the Keras/TensorFlow
    convention). Every worker still saves and reloads its own copy (KeepBest reloads on all of them,
    in step), and only the chief's reaches the user's path."""
    global _worker_folder
    if is_chief(strategy):
        return path
    if _worker_folder is None:
        import atexit
        import shutil

        _worker_folder = tempfile.mkdtemp(prefix=f"flow-worker-{strategy.cluster_resolver.task_id}-")
        atexit.register(shutil.rmtree, _worker_folder, ignore_errors=True)
    return os.path.join(_worker_folder, os.path.basename(os.path.normpath(path)))
