"""``gyre.keras.Sequential`` and ``gyre.keras.Model``: Keras's own models with a lean ``fit``.

They are subclasses of ``keras.Sequential`` / ``keras.Model`` (construction, ``compile``,
``evaluate``, ``predict``, ``save``/``load_model`` and every attribute are Keras's) whose
``train_step`` and ``fit`` loop are written the way Keras documents customising them, and do
what Keras's torch trainer does per batch with less Python around it:

* the forward of a ``Sequential`` whose layers are all in :data:`DIRECT_LAYERS` calls each
  layer's ``call`` in turn instead of ``Layer.__call__`` (which for these layers, with one tensor
  of the layers' own dtype, no mask, no activity regularizer and no mixed precision, converts
  nothing, builds nothing and attaches no mask); any other model runs ``self(x, training=True)``;
* the loss is the compiled loss function on the one output plus ``model.losses`` (regularizers),
  as ``Trainer.compute_loss`` sums them, without ``CompileLoss``'s structure matching;
* the gradients are cleared by setting each trainable variable's ``.grad`` to None (what
  ``torch.nn.Module.zero_grad`` does, without walking the module tree);
* the metrics' states are updated every batch, as Keras does, but their results (a division and
  a ``float()`` per metric) are computed only when a callback reads batch logs (the progress
  bar, or a callback that overrides ``on_train_batch_end`` / ``on_batch_end``) and at the end of
  each epoch;
* batch callbacks run in the training thread: Keras hands each ``on_train_batch_end`` to a
  thread pool, and waking that thread every batch costs more than the hook (which for
  ``History`` alone does nothing);
* NumPy/array data is sliced by Keras's own sampler, without the ``DataLoader`` iterator
  around it (the ``DataLoader`` is made once per ``fit`` instead of once per epoch), each batch
  indexed from torch tensors sharing the arrays' memory (what Keras's ``ArrayDataset`` returns
  for plain NumPy arrays, without its per-batch tree walk);
* where the compiled model is exactly the configuration written out in
  :mod:`gyre.keras._fast`, Dense, the loss, the loss tracker and accuracy updates and Keras's
  torch Adam run as the same torch operations Keras runs, without ``keras.ops`` around them.

All of it is written against Keras 3.15.1's private trainer code: :mod:`gyre.keras._guard`
checks before the first lean ``fit`` that the Keras installed has those functions with the
same source, and otherwise turns the lean loop (or only the torch forms) off with one warning.

Each of these gives the same batches (the global torch random stream is drawn exactly as stock
``fit`` draws it), the same losses and weights, and the same ``History`` as ``keras.Sequential``
/ ``keras.Model`` through stock ``fit`` (``tests/test_keras.py``). Whatever the lean path does not
cover runs Keras's own code transparently: a model whose ``train_step``, ``compute_loss`` or
``compute_metrics`` a subclass overrides, several outputs or losses, ``loss_weights``,
``jit_compile``, data that is not arrays (datasets, generators, ``PyDataset``), a batch whose
dtype or rank differs from the model's input.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import torch
from keras.src.models.functional import Functional as _KerasFunctional
from keras.src.models.model import functional_init_arguments

from . import _guard
from .rnn import GRU, LSTM, Recurrent, SimpleRNN

try:  # private parts of Keras the lean fit builds on; _guard checks them before a lean fit
    from keras.src import tree
    from keras.src.backend.torch import trainer as _torch_trainer
    from keras.src.callbacks.callback_list import CallbackList
    from keras.src.trainers import trainer as _base_trainer
    from keras.src.trainers.data_adapters import array_slicing, data_adapter_utils
    from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter
    from keras.src.utils import is_default as _is_default
except ImportError:  # another Keras: every fit is Keras's own (_guard says why, once)
    _torch_trainer = None

__all__ = ["Sequential", "Model", "Functional", "DIRECT_LAYERS"]

_register = keras.saving.register_keras_serializable(package="gyre")

#: layers whose ``call`` the lean forward runs directly (see the module docstring)
DIRECT_LAYERS = (LSTM, GRU, SimpleRNN, Recurrent, keras.layers.Dense, keras.layers.Dropout,
                 keras.layers.Activation)

_T = None if _torch_trainer is None else _torch_trainer.TorchTrainer
_BATCH_HOOKS = ("on_train_batch_end", "on_batch_end")


def _overrides(obj, name: str, base) -> bool:
    return getattr(type(obj), name) is not getattr(base, name)


def _direct_layers(model) -> list | None:
    """The layers of a Sequential the lean forward can run by their ``call``, or None."""
    if not isinstance(model, keras.Sequential) or model._functional is None:
        return None
    layers = model.layers
    dtypes = set()
    for layer in layers:
        policy = layer.dtype_policy
        if (type(layer) not in DIRECT_LAYERS or not layer.built
                or layer.activity_regularizer is not None
                or policy.compute_dtype != policy.variable_dtype
                or getattr(policy, "quantization_mode", None) is not None
                or getattr(layer, "stateful", False)):
            return None
        dtypes.add(policy.compute_dtype)
    inputs = model._functional.inputs
    if len(dtypes) != 1 or len(inputs) != 1 or inputs[0].dtype not in dtypes:
        return None
    return layers


def _as_input(x, shape, dtype):
    """``x`` as Keras's ``Functional`` hands it to its first layer (converted to the input's
    dtype), or None where it would do more (reshape it, or refuse it)."""
    if not (isinstance(x, torch.Tensor) and x.ndim == len(shape) + 1
            and all(s is None or s == n for s, n in zip(shape, x.shape[1:], strict=True))):
        return None
    return keras.ops.convert_to_tensor(x, dtype=dtype)


class _LeanTrainer:
    """The lean ``train_step`` and ``fit`` (module docstring), mixed into Keras's models."""

    #: during a lean fit: a :class:`_Plan`; None: Keras's own ``train_step``
    _gyre_plan = None
    _gyre_batch_logs = True  # whether this fit's callbacks read batch logs

    def _gyre_lean_plan(self):
        """What of the lean step applies to this compiled model, or None (stock ``train_step``)."""
        if (_overrides(self, "train_step", _LeanTrainer)
                or _overrides(self, "compute_loss", _base_trainer.Trainer)
                or _overrides(self, "compute_metrics", _base_trainer.Trainer)
                or self.jit_compile or self.optimizer is None):
            return None
        loss = self._compile_loss
        if loss is None or not loss.built or len(loss._flat_losses) != 1:
            return None
        path, fn, weight, _ = loss._flat_losses[0]
        if path != () or weight is not None:
            return None
        plan = _Plan(fn, self)
        layers = _direct_layers(self)
        if layers is not None:
            plan.spec = (tuple(self._functional.inputs[0].shape[1:]),
                         self._functional.inputs[0].dtype)
            plan.calls = []
            for layer in layers:
                dense = _fast().lean_dense(layer) if plan.fast else None
                plan.calls.append(
                    (dense, {}) if dense is not None else
                    (layer.call, {"training": True} if layer._call_has_training_arg else {}))
        return plan

    def train_step(self, data):
        plan = self._gyre_plan
        if plan is None:
            return super().train_step(data)
        x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
        weights = self.trainable_weights
        if tree.is_nested(y) or tree.is_nested(x) or not weights:
            return super().train_step(data)  # (which warns when nothing is trainable)
        y_pred = None if plan.calls is None else _as_input(x, *plan.spec)
        if y_pred is not None:
            for call, kwargs in plan.calls:
                y_pred = call(y_pred, **kwargs)
        else:
            y_pred = self(x, training=True)
        for v in weights:
            v.value.grad = None
        loss = None
        if plan.loss is not None and sample_weight is None:
            loss = plan.loss(y, y_pred)
        if loss is None:
            loss = plan.loss_fn(y, y_pred, sample_weight)
        if loss.dtype != plan.loss_dtype:
            loss = loss.to(plan.loss_dtype)
        extra = [self._aggregate_additional_loss(v) for v in self.losses]
        if extra:
            loss = keras.ops.sum([loss, *extra])
        unscaled, loss = loss, self.optimizer.scale_loss(loss)
        loss.backward()
        grads = [v.value.grad for v in weights]
        if plan.apply is not None and tuple(map(id, weights)) == plan.weight_ids:
            plan.apply(grads)
        else:
            with torch.no_grad():
                self.optimizer.apply(grads, weights)
        if plan.metrics is None or not plan.metrics(unscaled, x.shape[0], y, y_pred):
            self._loss_tracker.update_state(unscaled, sample_weight=x.shape[0])
            if self._compile_metrics is not None:
                self._compile_metrics.update_state(y, y_pred, sample_weight)
        return self.get_metrics_result() if self._gyre_batch_logs else None

    def fit(self, x=None, y=None, batch_size=None, epochs=1, verbose="auto", callbacks=None,
            validation_split=0.0, validation_data=None, shuffle=True, class_weight=None,
            sample_weight=None, initial_epoch=0, steps_per_epoch=None, validation_steps=None,
            validation_batch_size=None, validation_freq=1):
        """Keras's ``fit`` (``keras.src.backend.torch.trainer.TorchTrainer.fit``, every argument
        and callback as there), run with the lean step; see the module docstring."""
        args = dict(x=x, y=y, batch_size=batch_size, epochs=epochs, verbose=verbose,
                    callbacks=callbacks, validation_split=validation_split,
                    validation_data=validation_data, shuffle=shuffle,
                    class_weight=class_weight, sample_weight=sample_weight,
                    initial_epoch=initial_epoch, steps_per_epoch=steps_per_epoch,
                    validation_steps=validation_steps,
                    validation_batch_size=validation_batch_size, validation_freq=validation_freq)
        if not _guard.loop_ok():
            return super().fit(**args)
        if (isinstance(callbacks, CallbackList) or _overrides(self, "make_train_function", _T)
                or self.jit_compile or self.steps_per_execution != 1):
            return super().fit(**args)
        return _lean_fit(self, **args)


def _fast():
    from . import _fast as module
    return module


def _fast_on() -> bool:
    """Whether the torch forms of :mod:`gyre.keras._fast` are used (``GYRE_KERAS_FAST=0``:
    Keras's own Dense, loss, metrics and optimizer inside the lean step; so is a Keras whose
    code they write out differs from the one tested, see :mod:`gyre.keras._guard`)."""
    return os.environ.get("GYRE_KERAS_FAST", "1") != "0" and _guard.forms_ok()


class _Plan:
    """What the lean ``train_step`` runs for one ``fit``: ``calls`` (each layer's ``call`` or
    torch form, and its keywords; None: ``self(x)``) for inputs of ``spec`` (shape, dtype), the
    compiled loss function ``loss_fn`` and, where :mod:`gyre.keras._fast` covers them, the
    loss, the metric updates and the optimizer update in torch (None: Keras's own)."""

    calls = None
    spec = None

    def __init__(self, loss_fn, model):
        self.fast = fast = _fast_on()
        self.loss_fn = loss_fn
        self.loss_dtype = keras.src.backend.torch.core.to_torch_dtype(model._compile_loss.dtype)
        self.loss = _fast().lean_loss(loss_fn) if fast else None
        self.metrics = _fast().lean_metrics(model) if fast else None
        weights = model.trainable_weights
        self.weight_ids = tuple(map(id, weights))  # the variables ``apply`` was made for
        self.apply = _fast().lean_adam(model.optimizer, weights) if fast else None


if _torch_trainer is not None:  # (else no lean fit runs: see _guard)
    class _LeanCallbackList(CallbackList):
        """Keras's ``CallbackList`` with its batch-end hooks run in the calling thread, and not
        at all where no callback overrides them."""

        def _configure_async_dispatch(self, callbacks):
            self._async_train = self._async_test = self._async_predict = False

        def _reads(self, hook: str) -> bool:
            return any(not _is_default(getattr(cb, hook)) for cb in self.callbacks)

        def set_model(self, model):
            super().set_model(model)
            self.reads_batch_logs = any(self._reads(h) for h in _BATCH_HOOKS)
            self._quiet_begin = not (self._reads("on_train_batch_begin")
                                     or self._reads("on_batch_begin"))

        def on_train_batch_begin(self, batch, logs=None):
            if not self._quiet_begin:
                super().on_train_batch_begin(batch, logs)

        def on_train_batch_end(self, batch, logs=None):
            if self.reads_batch_logs:
                super().on_train_batch_end(batch, logs)


    class _LeanEpochIterator(_torch_trainer.TorchEpochIterator):
        """Keras's torch epoch iterator; for array data, Keras's own batch sampler and dataset
        without the ``DataLoader`` iterator, and one ``DataLoader`` per fit."""

        _loader = None

        def _get_iterator(self):
            if not isinstance(self.data_adapter, ArrayDataAdapter):
                return super()._get_iterator()
            if self._loader is None:
                self._loader = self.data_adapter.get_torch_dataloader()
            return _Batches(self._loader)


    class _Batches:
        """Iterating it yields what iterating ``loader`` (a map-style ``DataLoader`` with a batch
        sampler, no workers, a no-op collate) yields, drawing the global torch random stream as
        its iterator does: one draw for the workers' base seed when the iterator is made, then the
        sampler's own."""

        def __init__(self, loader):
            self.loader = loader

        _tensors = False  # not looked at yet

        def __iter__(self):
            torch.empty((), dtype=torch.int64).random_()  # the DataLoader iterator's base seed
            if self._tensors is False:
                self._tensors = _as_tensors(self.loader.dataset.array)
            if self._tensors is None:
                getitems = self.loader.dataset.__getitems__
                return (getitems(idx) for idx in self.loader.batch_sampler)
            tensors = self._tensors
            return (tuple(None if t is None else t[torch.as_tensor(idx)] for t in tensors)
                    for idx in self.loader.batch_sampler)


    #: NumPy dtypes whose arrays Keras's ``convert_to_tensor`` hands to ``torch.as_tensor``
    #: unchanged (it converts uint32 and bfloat16 first)
    _PLAIN = frozenset(np.dtype(d) for d in ("float16", "float32", "float64", "int8", "int16",
                                             "int32", "int64", "uint8", "bool"))

    def _as_tensors(arrays):
        """``arrays`` (the ``ArrayDataset``'s flat tuple of sliceables, or None entries) as CPU
        torch tensors sharing their memory, where each is a plain NumPy array: indexing one with
        a batch's indices gives what ``ArrayDataset.__getitems__`` gives (NumPy fancy indexing,
        then ``torch.as_tensor`` in the same dtype), without its per-batch tree walk and
        conversion. None (``__getitems__`` is used) for anything else."""
        if (not isinstance(arrays, tuple) or keras.src.backend.torch.core.get_device() != "cpu"):
            return None
        out = []
        for a in arrays:
            if a is None:
                out.append(None)
                continue
            if type(a) is not array_slicing.NumpySliceable:
                return None
            x = a.array
            if type(x) is not np.ndarray or x.dtype not in _PLAIN or x.ndim < 1:
                return None
            try:
                out.append(torch.from_numpy(x))
            except (TypeError, ValueError):  # negative strides, ...
                return None
        return tuple(out)


def _lean_fit(self, x, y, batch_size, epochs, verbose, callbacks, validation_split,
              validation_data, shuffle, class_weight, sample_weight, initial_epoch,
              steps_per_epoch, validation_steps, validation_batch_size, validation_freq):
    """``TorchTrainer.fit`` of Keras 3 line for line, but for the iterator, the callback list
    and the lean step (see the module docstring)."""
    from keras.src import optimizers as optimizers_module
    from keras.src.backend import config

    self._assert_compile_called("fit")
    max_epochs = config.max_epochs()
    if max_epochs and max_epochs < epochs:
        import warnings
        warnings.warn(f"Limiting epochs to {max_epochs}", stacklevel=2)
        epochs = max_epochs
    self._eval_epoch_iterator = None
    if validation_split and validation_data is None:
        (x, y, sample_weight), validation_data = array_slicing.train_validation_split(
            (x, y, sample_weight), validation_split=validation_split)
    if validation_data is not None:
        val_x, val_y, val_sample_weight = data_adapter_utils.unpack_x_y_sample_weight(
            validation_data)
    epoch_iterator = _LeanEpochIterator(
        x=x, y=y, sample_weight=sample_weight, batch_size=batch_size,
        steps_per_epoch=steps_per_epoch, shuffle=shuffle, class_weight=class_weight,
        steps_per_execution=self.steps_per_execution)
    self._symbolic_build(iterator=epoch_iterator)
    epoch_iterator.reset()
    callbacks = _LeanCallbackList(callbacks, add_history=True, add_progbar=verbose != 0,
                                  verbose=verbose, epochs=epochs,
                                  steps=epoch_iterator.num_batches, model=self)
    self._gyre_plan = self._gyre_lean_plan()
    self._gyre_batch_logs = callbacks.reads_batch_logs
    self.stop_training = False
    training_logs = {}
    self.make_train_function()
    callbacks.on_train_begin()
    initial_epoch = self._initial_epoch or initial_epoch
    try:
        for epoch in range(initial_epoch, epochs):
            self.reset_metrics()
            callbacks.on_epoch_begin(epoch)
            self.train()
            logs = {}
            for begin_step, end_step, data in epoch_iterator:
                callbacks.on_train_batch_begin(begin_step)
                logs = self.train_function(data)
                callbacks.on_train_batch_end(end_step, logs)
                if self.stop_training:
                    break
            # the step's logs are None where no callback read them: the metrics' results
            epoch_logs = dict(self.get_metrics_result() if logs is None
                              else self._get_metrics_result_or_logs(logs))
            self.eval()
            if validation_data is not None and self._should_eval(epoch, validation_freq):
                if getattr(self, "_eval_epoch_iterator", None) is None:
                    self._eval_epoch_iterator = _torch_trainer.TorchEpochIterator(
                        x=val_x, y=val_y, sample_weight=val_sample_weight,
                        batch_size=validation_batch_size or batch_size,
                        steps_per_execution=self.steps_per_execution,
                        steps_per_epoch=validation_steps, shuffle=False)
                val_logs = self.evaluate(
                    x=val_x, y=val_y, sample_weight=val_sample_weight,
                    batch_size=validation_batch_size or batch_size, steps=validation_steps,
                    callbacks=callbacks, return_dict=True, _use_cached_eval_dataset=True)
                epoch_logs.update({f"val_{name}": val for name, val in val_logs.items()})
            callbacks.on_epoch_end(epoch, epoch_logs)
            training_logs = epoch_logs
            if self.stop_training:
                break
    finally:
        self._gyre_plan = None
        self._gyre_batch_logs = True
    if isinstance(self.optimizer, optimizers_module.Optimizer) and epochs > 0:
        self.optimizer.finalize_variable_values(self.trainable_weights)
    if getattr(self, "_eval_epoch_iterator", None) is not None:
        del self._eval_epoch_iterator
    callbacks.on_train_end(logs=training_logs)
    return self.history


@_register
class Sequential(_LeanTrainer, keras.Sequential):
    """``keras.Sequential`` with gyre's lean ``fit`` (module docstring); a Keras program that
    imports ``Sequential`` from ``gyre.keras.models`` gets it with its import line changed."""


@_register
class Model(_LeanTrainer, keras.Model):
    """``keras.Model`` with gyre's lean ``fit`` (module docstring): functional
    (``Model(inputs, outputs)``, which makes a :class:`Functional`) or subclassed."""

    def __new__(cls, *args, **kwargs):
        if cls is Model and functional_init_arguments(args, kwargs):
            return Functional.__new__(Functional, *args, **kwargs)
        return super().__new__(cls, *args, **kwargs)


@_register
class Functional(Model, _KerasFunctional):
    """A functional ``gyre.keras.Model``: Keras's ``Functional`` with gyre's lean ``fit``
    (Keras would instead splice ``Functional`` into ``gyre.keras.Model``'s own bases)."""
