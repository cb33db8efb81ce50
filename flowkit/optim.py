"""The optimizers the scripts train with: Keras' Adam and AdamW with TensorFlow's fused update kernel
(ResourceApplyAdam) on the TensorFlow backend, the same numbers in fewer passes through memory; on JAX
and PyTorch Keras' element-wise update. Public Keras API only.

    from flowkit.optim import Adam, AdamW
    model.compile(optimizer=AdamW(2e-3, beta_1=0.9, beta_2=0.95, weight_decay=1e-4, global_clipnorm=1.0), ...)
"""
import re

import keras

from flowkit import backend

class Adam(keras.optimizers.Adam):
    """Keras' Adam with TensorFlow's fused update kernel (ResourceApplyAdam) for each variable: the
    same formula (m, v, bias-corrected step, ε outside the square root) in one pass over the variable,
    m and v, where Keras' update is five element-wise ops, each a pass through memory. Measured on a
    NICE step (19 M parameters, docs/running.md#performance): Keras' update was about half of the
    step's time without XLA. Elsewhere — another backend, a tf.distribute strategy (whose mirrored
    variables are updated replica by replica), sparse gradients — Keras' element-wise formula.

    Public Keras API only: `build` makes the slots with `add_optimizer_variables` (Keras Adam's names
    and order, so a .weights.h5 of either loads into the other) and keeps its own map from a variable
    to its slots; no amsgrad."""

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False, **kwargs):
        if amsgrad:
            raise ValueError("flowkit.optim.Adam has no amsgrad (use keras.optimizers.Adam)")
        super().__init__(learning_rate, beta_1, beta_2, epsilon, amsgrad=False, **kwargs)

    @staticmethod
    def slot_keys(variable):
        """Keys under which update_step finds a variable's slots: on TensorFlow it is handed the
        tf.Variable (each replica's copy under a strategy), elsewhere the keras.Variable itself."""
        if backend.name() != "tensorflow":
            return [id(variable)]
        import tensorflow as tf

        value = variable.value if isinstance(variable, keras.Variable) else variable
        return [v.ref() for v in tf.distribute.get_strategy().experimental_local_results(value)]

    def build(self, var_list):
        if self.built:
            return
        keras.optimizers.Optimizer.build(self, var_list)  # the base's part (iterations, EMA), not Adam's slots
        self.momentums, self.velocities = self.add_optimizer_variables(var_list, ["momentum", "velocity"])
        self.slot_index = {key: i for i, variable in enumerate(var_list) for key in self.slot_keys(variable)}

    def decay_factor(self, variable, learning_rate):
        """None: no weight decay (AdamW decays)."""
        return None

    def update_step(self, gradient, variable, learning_rate):
        i = self.slot_index[self.slot_keys(variable)[0]]
        m, v, dtype = self.momentums[i], self.velocities[i], variable.dtype
        lr = keras.ops.cast(learning_rate, dtype)
        factor = self.decay_factor(variable, lr)
        if factor is not None:  # decoupled weight decay: w ← w·(1 − lr·λ), one pass
            self.assign(variable, variable * factor)
        step = keras.ops.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = keras.ops.cast(self.beta_1, dtype), keras.ops.cast(self.beta_2, dtype)
        if backend.name() == "tensorflow" and self._fused_update(gradient, variable, m, v, lr, step,
                                                                 beta_1, beta_2, dtype):
            return
        ops = keras.ops  # Keras Adam's update_step, element by element
        gradient = ops.cast(gradient, dtype)
        alpha = lr * ops.sqrt(1 - beta_2 ** step) / (1 - beta_1 ** step)
        self.assign_add(m, ops.multiply(ops.subtract(gradient, m), 1 - self.beta_1))
        self.assign_add(v, ops.multiply(ops.subtract(ops.square(gradient), v), 1 - self.beta_2))
        self.assign_sub(variable, ops.divide(ops.multiply(m, alpha), ops.add(ops.sqrt(v), self.epsilon)))


    def _fused_update(self, gradient, variable, m, v, lr, step, beta_1, beta_2, dtype):
        """TensorFlow's ResourceApplyAdam on one variable; False (nothing done) under a tf.distribute
        strategy or for sparse gradients, where Keras' element-wise formula runs instead."""
        import tensorflow as tf

        if tf.distribute.has_strategy() or isinstance(gradient, tf.IndexedSlices):
            return False
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=m.value.handle, v=v.value.handle, beta1_power=beta_1 ** step,
            beta2_power=beta_2 ** step, lr=lr, beta1=beta_1, beta2=beta_2,
            epsilon=tf.cast(self.epsilon, dtype), grad=tf.cast(gradient, dtype))
        return True


class AdamW(Adam):
    """keras.optimizers.AdamW (decoupled weight decay, Loshchilov & Hutter 2019) with the fused Adam
    update: each variable is first scaled by 1 − lr·λ (one element-wise op, where Keras' decay is
    three), then ResourceApplyAdam. The same numbers as Keras' AdamW to float rounding, the same
    arguments; `exclude_from_weight_decay` as Keras' (variables, or name patterns: re.search on
    each variable's name), before the optimizer is built."""

    def __init__(self, learning_rate=0.001, weight_decay=0.004, beta_1=0.9, beta_2=0.999, epsilon=1e-7,
                 amsgrad=False, **kwargs):
        super().__init__(learning_rate, beta_1, beta_2, epsilon, amsgrad, **kwargs)  # the base decays nothing
        self.decay, self.no_decay_keys, self.no_decay_names = weight_decay, set(), None

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        if self.built:
            raise ValueError("exclude_from_weight_decay() goes before the optimizer is built")
        self.no_decay_keys = {key for variable in var_list or [] for key in self.slot_keys(variable)}
        self.no_decay_names = re.compile("|".join(var_names)) if var_names else None

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self.decayed = {key for variable in var_list for key in self.slot_keys(variable)
                        if self.decay and key not in self.no_decay_keys
                        and not (self.no_decay_names and self.no_decay_names.search(variable.name))}

    def decay_factor(self, variable, learning_rate):
        if self.slot_keys(variable)[0] not in self.decayed:
            return None
        return 1 - learning_rate * keras.ops.cast(self.decay, learning_rate.dtype)

    def get_config(self):
        return {**super().get_config(), "weight_decay": self.decay}
