"""The backends' own APIs, in one place, so that the layers and the scripts speak only `keras.ops`.
Keras 3 has no gradient call of its own (keras#19220: use the backend's), no replica id, and no way to
compile an arbitrary function of a model's variables; each of those is here, once per backend
(TensorFlow, JAX, PyTorch). Everything else in the project is backend-neutral.

    name, describe        which backend runs, on which device (the `backend:` line of a run)
    device_names          the accelerators' model names (tools.gpu_check's report)
    tensorflow_importable whether TensorFlow can be imported here (tf.data pipelines, tf.distribute)
    vjp                   f(x) with its vector-Jacobian products wᵀ ∂f/∂x (i-ResNet's log-det)
    grad_of_sum           ∇ₓ Σ f(x) (TarFlow's denoising score)
    gradients             a scalar's gradients to tensors and to Keras variables (tools.measure's profiles)
    function              a function of a model, compiled (tf.function, jax.jit over the variables)
    fused                 an element-wise chain as one XLA program (TensorFlow; elsewhere as it is)
    float64               64-bit floats on (JAX has them off unless asked: the tests' float64 checks)
    bounded_while         a while loop that reverse-mode autodiff goes through (roulette's N terms)
    uniform               U(0, 1) from a SeedGenerator, one stream per tf.distribute replica
    deterministic_ops     run-to-run identical kernels where the backend needs asking (TensorFlow)
    quiet_retracing       no notice when `function` traces again on purpose (TensorFlow's logger)
"""
import contextlib

import keras
from keras import ops

from flowkit import tensorflow_importable  # noqa: F401  (known before Keras loads: flowkit/__init__)


def name():
    return keras.backend.backend()


def accelerators():
    """The backend's accelerator devices (GPUs, TPUs) as short names; [] on a CPU."""
    if name() == "tensorflow":
        import tensorflow as tf

        return [d.name.replace("/physical_device:", "") for d in tf.config.list_physical_devices()
                if d.device_type != "CPU"]
    if name() == "jax":
        import jax

        return [f"{d.platform.upper()}:{d.id}" for d in jax.devices() if d.platform != "cpu"]
    if name() == "torch":
        import torch

        return [f"GPU:{i}" for i in range(torch.cuda.device_count())]
    return []


def device_names():
    """The model names of the backend's accelerators (e.g. "NVIDIA H100 80GB HBM3"), one per device of
    `accelerators`; [] on a CPU."""
    if name() == "tensorflow":
        import tensorflow as tf

        return [tf.config.experimental.get_device_details(d).get("device_name", d.name)
                for d in tf.config.list_physical_devices() if d.device_type != "CPU"]
    if name() == "jax":
        import jax

        return [d.device_kind for d in jax.devices() if d.platform != "cpu"]
    if name() == "torch":
        import torch

        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return []


def describe():
    """`backend: NAME (DEVICES)`: the line every run prints at its start."""
    devices = accelerators()
    return f"backend: {name()} ({', '.join(devices) if devices else 'CPU'})"


class _VJP:
    """y = f(x) and the map w ↦ wᵀ ∂y/∂x, differentiable again (so a training step's gradient goes
    through the products, as i-ResNet's log-det estimate needs)."""

    def __init__(self, fn, x):
        self.x = x
        backend = name()
        if backend == "tensorflow":
            import tensorflow as tf

            with tf.GradientTape(persistent=True) as self.tape:
                self.tape.watch(x)
                self.y = fn(x)
        elif backend == "jax":
            import jax

            self.y, self._pull = jax.vjp(fn, x)
        elif backend == "torch":
            import torch

            self._create = torch.is_grad_enabled()
            with torch.enable_grad():
                if not x.requires_grad:  # an input: nothing upstream to keep
                    self.x = x = x.detach().requires_grad_()
                self.y = fn(x)
        else:
            raise NotImplementedError(f"no vector-Jacobian products on the {backend} backend")

    def __call__(self, w):
        backend = name()
        if backend == "tensorflow":
            return self.tape.gradient(self.y, self.x, output_gradients=w)
        if backend == "jax":
            return self._pull(w)[0]
        import torch

        with torch.enable_grad():
            return torch.autograd.grad(self.y, self.x, grad_outputs=w, retain_graph=True,
                                       create_graph=self._create)[0]

    def jacobian(self):
        """(batch, d, d): ∂y_b/∂x_b of a map applied to each example alone, row i = e_iᵀ J."""
        shape = tuple(self.y.shape[1:])  # a unit vector e_i is in y's shape, its product in x's
        d = 1
        for s in shape:
            d *= int(s)
        eye = ops.eye(d, dtype=self.x.dtype)
        if name() == "tensorflow" and d > 16:  # beyond 16 rows, one vectorised Jacobian
            return ops.reshape(self.tape.batch_jacobian(self.y, self.x), (-1, d, d))
        if name() == "jax" and d > 16:
            import jax

            rows = jax.vmap(lambda e: self(ops.broadcast_to(ops.reshape(e, shape), ops.shape(self.y))))(eye)
            return ops.transpose(ops.reshape(rows, (d, -1, d)), (1, 0, 2))
        if name() == "torch" and d > 16:
            import torch

            units = ops.broadcast_to(ops.reshape(eye, (d, 1, *shape)), (d, *ops.shape(self.y)))
            with torch.enable_grad():
                rows = torch.autograd.grad(self.y, self.x, grad_outputs=units, retain_graph=True,
                                           create_graph=self._create, is_grads_batched=True)[0]
            return ops.transpose(ops.reshape(rows, (d, -1, d)), (1, 0, 2))
        rows = [ops.reshape(self(ops.broadcast_to(ops.reshape(eye[i], shape), ops.shape(self.y))), (-1, d))
                for i in range(d)]
        return ops.stack(rows, axis=1)


def vjp(fn, x):
    """(f(x), pullback): pullback(w) = wᵀ ∂f/∂x, as often as needed, differentiable again;
    pullback.jacobian() the per-example Jacobian (small dimensions)."""
    products = _VJP(fn, x)
    return products.y, products


def grad_of_sum(fn, x, *rest):
    """∇ₓ Σ fn(x, *rest): with examples independent, each example's gradient of its own value."""
    backend = name()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(x)
            total = tf.reduce_sum(fn(x, *rest))
        return tape.gradient(total, x)
    if backend == "jax":
        import jax

        return jax.grad(lambda x: ops.sum(fn(x, *rest)))(x)
    if backend == "torch":
        import torch

        with torch.enable_grad():
            x = x.detach().requires_grad_()
            return torch.autograd.grad(ops.sum(fn(x, *rest)), x)[0]
    raise NotImplementedError(f"no gradients on the {backend} backend")


def function(fn, variables=(), xla=False):
    """`fn` compiled once per input shape, reading `variables` (a model's `.variables`) as they are at
    each call: on TensorFlow a tf.function (XLA with `xla`); on JAX jax.jit with the variables' values
    passed in and their updates (seed generators' states) written back, so the program follows
    training instead of freezing the weights it was traced with; on PyTorch `fn` itself."""
    backend = name()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, reduce_retracing=True, jit_compile=xla, autograph=False)
    if backend != "jax":
        return fn
    import jax

    variables = list(variables)

    def pure(values, *args):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))) as scope:
            out = fn(*args)
            new = [scope.get_current_value(v) for v in variables]
        return out, [v if n is None else n for v, n in zip(values, new)]

    jitted = jax.jit(pure)

    def call(*args):
        out, new = jitted([v.value for v in variables], *args)
        for v, value in zip(variables, new):
            v.assign(value)
        return out

    return call


@contextlib.contextmanager
def float64():
    """Within the `with`, float64 tensors are float64: JAX keeps 64-bit values off by default (its
    `jax_enable_x64`, which would silently make float64 float32); the other backends always have them."""
    if name() != "jax":
        yield
        return
    import jax

    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", before)


def fused(fn):
    """`fn` as one XLA program on TensorFlow (`tf.function(jit_compile=True)`), `fn` itself elsewhere (JAX
    compiles the whole step with XLA already; PyTorch runs op by op)."""
    if name() != "tensorflow":
        return fn
    import tensorflow as tf

    return tf.function(fn, jit_compile=True, autograph=False)


def bounded_while(cond, body, loop_vars, max_iter):
    """`while cond(*v): v = body(*v)` for at most `max_iter` rounds, differentiable in reverse mode on
    every backend: TensorFlow's while_loop; on JAX a scan of `max_iter` rounds, each skipping its work
    once `cond` fails (JAX cannot differentiate a while loop of unknown length); on PyTorch a Python loop."""
    backend = name()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.while_loop(cond, body, loop_vars, maximum_iterations=max_iter)
    if backend == "jax":
        import jax

        def step(v, _):
            return jax.lax.cond(cond(*v), lambda v: tuple(body(*v)), lambda v: tuple(v), v), None

        return jax.lax.scan(step, tuple(loop_vars), None, length=max_iter)[0]
    v = tuple(loop_vars)
    for _ in range(max_iter):
        if not bool(cond(*v)):
            break
        v = tuple(body(*v))
    return v


def uniform(shape, dtype, generator):
    """U(0,1) from a SeedGenerator; on TensorFlow each replica of a tf.distribute strategy folds its
    index into the seed, else every replica would draw the same numbers for its share of the batch.
    Replica 0 (and no strategy) draws exactly what keras.random.uniform would."""
    if name() != "tensorflow":
        return keras.random.uniform(shape, dtype=dtype, seed=generator)
    import tensorflow as tf

    seed = generator.next()
    context = tf.distribute.get_replica_context()
    if context is not None:
        seed = seed + tf.cast(tf.stack([context.replica_id_in_sync_group, 0]), seed.dtype)
    seed = tf.cast(tf.math.floormod(seed, tf.int32.max - 1), "int32")  # as Keras' TF backend does
    return tf.random.stateless_uniform(shape, seed=seed, dtype=dtype)


def deterministic_ops():
    """Asks the backend for run-to-run identical kernels: TensorFlow's op determinism (its default
    kernels may reduce in any order); JAX's CPU and PyTorch's CPU kernels are deterministic already."""
    if name() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def quiet_retracing():
    """Silences TensorFlow's notice that tf.functions retrace often, for a caller that compiles one
    program per setting on purpose (TarFlow's guidance sweep); the other backends give none."""
    if name() == "tensorflow":
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")


def gradients(fn, variables=(), inputs=()):
    """(fn(*inputs), [∂fn/∂x for x in inputs] + [∂fn/∂v for v in variables]): a scalar fn of the tensors
    `inputs` and of the Keras `variables` it reads. On JAX the variables' values are traced through a
    StatelessScope (inside `function`, variables not listed read their stored values)."""
    backend, variables, inputs = name(), list(variables), list(inputs)
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(inputs)
            value = fn(*inputs)
        return value, tape.gradient(value, [*inputs, *variables])
    if backend == "jax":
        import jax

        def pure(xs, values):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return fn(*xs)

        value, (gx, gv) = jax.value_and_grad(pure, argnums=(0, 1))(inputs, [v.value for v in variables])
        return value, [*gx, *gv]
    if backend == "torch":
        import torch

        with torch.enable_grad():
            xs = [ops.convert_to_tensor(x).detach().requires_grad_() for x in inputs]
            value = fn(*xs)
            grads = torch.autograd.grad(value, [*xs, *(v.value for v in variables)], allow_unused=True)
        return value, list(grads)
    raise NotImplementedError(f"no gradients on the {backend} backend")
