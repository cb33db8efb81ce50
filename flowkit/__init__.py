"""flowkit: the machinery the five article scripts share, so that each script holds only its article.

    cli      the command line: common flags and their checks, the start of a run, a script's main
    run      `Run`, the callbacks handed to `encoder.fit`: best weights, the collapse rule, --resume, logs
    backend  the backends' own APIs (gradients, compiling, loops), the one place that names them
    kernels  TarFlow's fused element-wise kernels (GELU, layer norm, softmax) with written-out gradients
    optim    Adam and AdamW with TensorFlow's fused update
    devices  tf.distribute strategies, the precision choice, which worker writes files
    data     MNIST (offline fallback) and image folders
    pipeline the batches fit reads: tf.data on TensorFlow, NumPy PyDatasets on JAX and PyTorch
    density  dequantization, the prior term, bits/dim
    sample   temperature codes, batched decoding, slerp, picture grids
    files    UserError, atomic writes, weights files with their architecture record, pictures
    score    the sample score: a small digit classifier's verdict on a model's samples
    curves   epoch logs drawn and tabled

Importing the package imports TensorFlow, where it is installed, with its start-up notices kept off
stderr (on JAX and PyTorch too: Keras' set_random_seed imports it); JAX and PyTorch need no TensorFlow.
It never imports an article script or a tool (tests/test_imports.py).
"""
import importlib.util
import json
import os
import sys


def _keras_backend():
    """The backend Keras will choose, read as Keras reads it (KERAS_BACKEND, else keras.json, else
    TensorFlow) without importing Keras: its TensorFlow backend would load TensorFlow loudly."""
    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as f:
            return json.load(f).get("backend", "tensorflow")
    except (OSError, ValueError):
        return "tensorflow"


def _load_tensorflow_quietly():
    """Imports TensorFlow and lets it probe the devices with stderr sent to /dev/null. TensorFlow
    2.21 writes its C++ start-up notices (oneDNN, CUDA stub, CPU features, cuInit) through absl
    before any log level applies, so TF_CPP_MIN_LOG_LEVEL no longer silences them; a run's stderr
    should hold only our own lines. TF_CPP_MIN_LOG_LEVEL=0 keeps them. Python errors still show:
    stderr is restored before they propagate."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0":
        import tensorflow
        return tensorflow
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow

        tensorflow.config.list_physical_devices()
        return tensorflow
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def tensorflow_importable():
    """True when `import tensorflow` would succeed (a path entry may block it, as the tests do); here,
    not in flowkit.backend, because it must be known before Keras is imported."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"] is not None
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):
        return False


# On JAX and PyTorch too where TensorFlow is installed: Keras' set_random_seed imports it to seed it
if _keras_backend() == "tensorflow" or tensorflow_importable():
    _load_tensorflow_quietly()
