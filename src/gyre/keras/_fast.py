"""Torch forms of the Keras pieces the lean ``train_step`` runs each batch (Dense, the loss, the
loss tracker and metrics, the optimizer update), each the same torch operations in the same
order as Keras 3's torch backend runs them, without the ``keras.ops`` dispatch, dtype
standardisation and structure handling around them.

Each ``lean_*`` function looks at one Keras object once per ``fit`` and returns the torch form,
or None where the object is anything other than the exact configuration written out here (a
subclass, another argument, a loss scale, gradient clipping, ...): the caller then runs Keras's
own object. ``tests/test_keras.py`` checks each against Keras bit for bit.
"""

from __future__ import annotations

import keras
import torch
from keras.src import backend as _backend
from keras.src.backend.torch.optimizers.torch_adam import Adam as _TorchAdam
from keras.src.losses import losses as _losses
from keras.src.metrics import accuracy_metrics as _accuracy
from keras.src.metrics import reduction_metrics as _reduction

__all__ = ["lean_dense", "lean_loss", "lean_metrics", "lean_adam"]


def lean_dense(layer):
    """``Dense.call`` as ``(x) -> y`` in torch: ``matmul``, ``add`` of the bias, the activation
    (softmax as ``torch.softmax``, which is what ``keras.activations.softmax`` runs on the torch
    backend; any other activation by Keras's own function). None for a LoRA or quantized layer."""
    if (type(layer) is not keras.layers.Dense or layer.lora_enabled
            or getattr(layer, "quantization_mode", None) is not None):
        return None
    kernel = layer.kernel.value
    bias = None if layer.bias is None else layer.bias.value
    act = layer.activation
    softmax = act is keras.activations.softmax
    if act is keras.activations.linear:
        act = None

    def call(x):
        if x.dtype != kernel.dtype:
            return layer.call(x)
        y = torch.matmul(x, kernel)
        if bias is not None:
            y = torch.add(y, bias)
        if softmax and y.ndim > 1:
            return torch.softmax(y, dim=-1)
        return y if act is None else act(y)

    return call


def lean_loss(loss):
    """A ``(y_true, y_pred) -> loss`` for the compiled loss ``loss`` called without a sample
    weight, or None. Covered: ``categorical_crossentropy`` (by name or function) with its
    defaults (probabilities, no label smoothing, last axis), reduction ``sum_over_batch_size``:
    Keras's ``LossFunctionWrapper.__call__`` -> ``categorical_crossentropy`` -> the torch
    backend's, then ``reduce_values``'s sum over the batch divided by its element count."""
    if (type(loss) is not _losses.LossFunctionWrapper
            or loss.fn is not _losses.categorical_crossentropy
            or loss._fn_kwargs or loss.reduction != "sum_over_batch_size"):
        return None
    dtype = keras.src.backend.torch.core.to_torch_dtype(loss.dtype)
    eps = _backend.epsilon()

    def call(y_true, y_pred):
        if (not isinstance(y_true, torch.Tensor) or y_true.shape != y_pred.shape
                or y_pred.ndim < 1 or y_pred.shape[-1] == 1):
            return None  # Keras's own path (its rank handling, its warning)
        y_pred = y_pred.to(dtype)
        y_true = y_true.to(dtype)
        p = y_pred / torch.sum(y_pred, dim=-1, keepdim=True)
        p = torch.clip(p, eps, 1.0 - eps)
        values = -torch.sum(y_true * torch.log(p), dim=-1)
        if values.ndim == 0 or tuple(values.shape) == (0,):
            return values
        total = torch.sum(values)
        # divide_no_nan by the element count (never 0 here), as reduce_values does
        n = torch.as_tensor(values.numel(), dtype=total.dtype)
        return torch.where(n == 0, 0, torch.divide(total, n))

    return call


def _add_(variable, value):
    """``variable.assign_add(value)`` (``assign(variable + value)``: a copy of the sum)."""
    variable.value.copy_(variable.value + value)


def lean_metrics(model):
    """``(loss, batch_size, y_true, y_pred) -> None``: the loss tracker's and the compiled
    metrics' ``update_state`` without a sample weight, or None. Covered: the loss tracker
    (``Mean``) and compiled metrics that are all ``CategoricalAccuracy`` on the one output
    ("accuracy" with a one-hot target), no weighted metrics."""
    tracker = model._loss_tracker
    if type(tracker) is not _reduction.Mean:
        return None
    cm = model._compile_metrics
    accs = []
    if cm is not None:
        if (not cm.built or len(cm._flat_metrics) != 1 or any(cm._flat_weighted_metrics)
                or cm._flat_metrics[0] is None):
            return None
        for m in cm._flat_metrics[0].metrics:
            if (type(m) is not _accuracy.CategoricalAccuracy
                    or m._fn is not _accuracy.categorical_accuracy or m._fn_kwargs):
                return None
            accs.append(m)
    to_dtype = keras.src.backend.torch.core.to_torch_dtype
    tdt = to_dtype(tracker.dtype)
    floatx = to_dtype(keras.backend.floatx())

    def update(loss, batch_size, y_true, y_pred):
        if accs and (not isinstance(y_true, torch.Tensor) or y_true.ndim != y_pred.ndim
                     or y_true.ndim < 1 or y_true.shape[-1] == 1):
            return False
        with torch.no_grad():
            # Mean.update_state(loss, sample_weight=batch_size): total += loss * n, count += n
            n = torch.as_tensor(batch_size, dtype=tdt)
            _add_(tracker.total, torch.sum(loss.to(tdt) * n))
            _add_(tracker.count, torch.sum(n))
            if accs:
                # categorical_accuracy: argmax of both as int32, compared in y_pred's dtype
                t = torch.argmax(y_true, dim=-1).to(torch.int32).to(y_pred.dtype)
                p = torch.argmax(y_pred, dim=-1).to(torch.int32).to(y_pred.dtype)
                matches = torch.eq(t, p).to(floatx)
                for m in accs:
                    mdt = to_dtype(m.dtype)
                    _add_(m.total, torch.sum(matches.to(mdt)))
                    _add_(m.count, torch.as_tensor(matches.shape[0], dtype=mdt))
        return True

    return update


def lean_adam(optimizer, weights):
    """``(grads) -> None``: ``optimizer.apply(grads, weights)`` for Keras's own Adam on the torch
    backend (its ``_parallel_update_step``, the ``torch._foreach_*`` form of Keras's formula:
    ``alpha = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)``, ``w -= alpha * m / (sqrt(v) + eps)``,
    then ``iterations += 1``), or None where ``apply`` would do more: AMSGrad, weight decay,
    clipping, EMA, a loss scale, gradient accumulation, a learning-rate schedule or callable,
    variable constraints, ``overwrite_with_gradient``, an unbuilt optimizer."""
    if (type(optimizer) is not _TorchAdam or not optimizer.built or optimizer.amsgrad
            or optimizer.weight_decay is not None or optimizer.clipnorm is not None
            or optimizer.clipvalue is not None or optimizer.global_clipnorm is not None
            or optimizer.use_ema or optimizer.loss_scale_factor is not None
            or optimizer.gradient_accumulation_steps
            or not isinstance(optimizer._learning_rate, _backend.Variable)):
        return None
    known = optimizer._trainable_variables_indices
    if (not weights or any(optimizer._var_key(v) not in known for v in weights)
            or any(v.constraint is not None or getattr(v, "overwrite_with_gradient", False)
                   for v in weights)):
        return None
    values = [v.value for v in weights]
    dtype = values[0].dtype
    if any(v.dtype != dtype for v in values):
        return None
    index = optimizer._get_variable_index
    m_list = [optimizer._momentums[index(v)].value for v in weights]
    v_list = [optimizer._velocities[index(v)].value for v in weights]
    lr_var, it = optimizer._learning_rate, optimizer._iterations
    b1, b2, eps = optimizer.beta_1, optimizer.beta_2, optimizer.epsilon

    def apply(grads):
        if any(g is None for g in grads):
            optimizer.apply(grads, weights)  # Keras's filtering of empty gradients
            return
        with torch.no_grad():
            lr = lr_var.value.to(dtype)
            local_step = (it.value + torch.as_tensor(1, dtype=it.value.dtype)).to(dtype)
            beta_1_power = torch.pow(torch.as_tensor(b1, dtype=dtype), local_step)
            beta_2_power = torch.pow(torch.as_tensor(b2, dtype=dtype), local_step)
            alpha = lr * torch.sqrt(1 - beta_2_power) / (1 - beta_1_power)
            torch._foreach_mul_(m_list, b1)
            torch._foreach_add_(m_list, grads, alpha=1 - b1)
            torch._foreach_mul_(v_list, b2)
            torch._foreach_add_(v_list, torch._foreach_mul(grads, grads), alpha=1 - b2)
            torch._foreach_add_(
                values,
                torch._foreach_div(torch._foreach_mul(m_list, alpha),
                                   torch._foreach_add(torch._foreach_sqrt(v_list), eps)),
                alpha=-1)
            _add_(it, torch.as_tensor(1, dtype=it.value.dtype))

    return apply

