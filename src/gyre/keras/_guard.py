"""Whether the Keras installed is the one gyre.keras's lean ``fit`` was written against.

The lean ``fit`` (:mod:`gyre.keras.training`) is Keras 3's ``TorchTrainer.fit`` / ``train_step``
re-written, and builds on private parts of Keras (``keras.src``: the torch trainer's epoch
iterator, ``CallbackList``'s async dispatch, the array data adapter's ``DataLoader``,
``CompileLoss``'s flattened losses); its torch forms (:mod:`gyre.keras._fast`) re-write Keras's
Dense, loss, metric and Adam code. Any of these may change in another Keras release without
notice, and a change would make the lean path differ from Keras (or fail). So before the first
lean ``fit`` each of the Keras functions it mirrors or calls is looked up and its source hashed;
where a name is missing or a source differs from the Keras release gyre was tested on
(:data:`TESTED`), ``fit`` runs Keras's own code (the lean loop and the torch forms are turned
off separately), with one warning saying so. Keras's own ``fit`` is always right; only speed is
lost.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import warnings

__all__ = ["TESTED", "loop_ok", "forms_ok", "check", "reset"]

#: the Keras release the hashes below were taken from
TESTED = "3.15.1"

#: (module, attribute path): sha256 of its source (first 16 hex digits) in Keras ``TESTED``.
#: The lean loop: what gyre.keras.training copies or relies on.
LOOP = {
    ("keras.src.backend.torch.trainer", "TorchTrainer.fit"): "c88f3a56fe97a6a7",
    ("keras.src.backend.torch.trainer", "TorchTrainer.train_step"): "a638d4455d8fced6",
    ("keras.src.backend.torch.trainer", "TorchTrainer.make_train_function"): "280aed779362a2df",
    ("keras.src.backend.torch.trainer", "TorchEpochIterator._get_iterator"): "eaf05f914f6fc4c3",
    ("keras.src.trainers.epoch_iterator", "EpochIterator.__next__"): "8b12aa117bb200a4",
    ("keras.src.trainers.epoch_iterator", "EpochIterator.__iter__"): "a42e8ef4b2ac4dea",
    ("keras.src.trainers.trainer", "Trainer.compute_loss"): "450e48288d4857f0",
    ("keras.src.trainers.trainer", "Trainer._compute_loss"): "13153b89c765b0d6",
    ("keras.src.trainers.trainer", "Trainer.compute_metrics"): "8c5a423878e01a48",
    ("keras.src.trainers.trainer", "Trainer.get_metrics_result"): "89f313bc35c1b9c1",
    ("keras.src.trainers.trainer", "Trainer._get_metrics_result_or_logs"): "1c7ab4a2c8e61868",
    ("keras.src.trainers.trainer", "Trainer._symbolic_build"): "96220cc3b88fe768",
    ("keras.src.trainers.trainer", "Trainer._aggregate_additional_loss"): "0195f96bccf193d2",
    ("keras.src.trainers.compile_utils", "CompileLoss.build"): "ef0636a9031b5cb0",
    ("keras.src.trainers.compile_utils", "CompileLoss.call"): "402aaf05f91c73c4",
    ("keras.src.callbacks.callback_list", "CallbackList.__init__"): "5d0d38afece9158a",
    ("keras.src.callbacks.callback_list", "CallbackList._configure_async_dispatch"): "be3563e8da2546cd",
    ("keras.src.callbacks.callback_list", "CallbackList.on_train_batch_begin"): "d2ff091ad71d2dad",
    ("keras.src.callbacks.callback_list", "CallbackList.on_train_batch_end"): "e719177bc8b3e667",
    ("keras.src.callbacks.callback_list", "CallbackList.set_model"): "8513cc850af1dbbf",
    ("keras.src.trainers.data_adapters.array_data_adapter",
     "ArrayDataAdapter.get_torch_dataloader"): "a53c7a45c31904d7",
    ("keras.src.trainers.data_adapters.array_slicing", "Sliceable.__getitem__"): "2e618cef08b0844a",
    ("keras.src.trainers.data_adapters.array_slicing",
     "Sliceable.convert_to_torch_compatible"): "da57e7cc20b383e3",
    ("keras.src.trainers.data_adapters.array_slicing", "convert_to_sliceable"): "7a07fa6641b3fc08",
    ("keras.src.backend.torch.core", "convert_to_tensor"): "3d6b9ba9a06f6e16",
    ("keras.src.trainers.data_adapters.array_slicing", "train_validation_split"): "97e71878bad61504",
    ("keras.src.trainers.data_adapters.data_adapter_utils", "unpack_x_y_sample_weight"): "ff6afba0383c3fae",
    ("keras.src.layers.layer", "Layer.__call__"): "4fb7e42e4ffd9b1a",
    ("keras.src.models.functional", "Functional.call"): "efd7243f579aa6f3",
    ("keras.src.utils", "is_default"): "b884cb368d0958c3",
}

#: The torch forms: the Keras code gyre.keras._fast writes out in torch.
FORMS = {
    ("keras.src.layers.core.dense", "Dense.call"): "50d7f2ec4bcf91d0",
    ("keras.src.activations.activations", "softmax"): "8c12079da0e4a413",
    ("keras.src.backend.torch.nn", "softmax"): "b4fba3f68571dc4c",
    ("keras.src.backend.torch.numpy", "matmul"): "4f3375e4f9a5d2cb",
    ("keras.src.losses.loss", "Loss.__call__"): "f42c42282ee8902b",
    ("keras.src.losses.loss", "reduce_values"): "60b0462147725ad2",
    ("keras.src.losses.loss", "reduce_weighted_values"): "1976df12ea192061",
    ("keras.src.losses.losses", "LossFunctionWrapper.call"): "d2d39cff93441993",
    ("keras.src.losses.losses", "categorical_crossentropy"): "86e9c79adb361db7",
    ("keras.src.backend.torch.nn", "categorical_crossentropy"): "d4ccc2d9219f294b",
    ("keras.src.backend.torch.numpy", "divide_no_nan"): "3e26c7c12e7aeb89",
    ("keras.src.metrics.reduction_metrics", "reduce_to_samplewise_values"): "46aacc7892d404ed",
    ("keras.src.metrics.reduction_metrics", "Mean.update_state"): "addc194e254fbb64",
    ("keras.src.metrics.reduction_metrics", "MeanMetricWrapper.update_state"): "1763e0dd65d030f5",
    ("keras.src.metrics.accuracy_metrics", "categorical_accuracy"): "64b6e95d0ebcdc44",
    ("keras.src.trainers.compile_utils", "CompileMetrics.update_state"): "75fad85bf74f4a10",
    ("keras.src.trainers.compile_utils", "MetricsList.update_state"): "2d388dafe5c9dff5",
    ("keras.src.optimizers.base_optimizer", "BaseOptimizer.apply"): "43097be63b919d03",
    ("keras.src.optimizers.base_optimizer", "BaseOptimizer._backend_apply_gradients"): "48d6e24d58039241",
    ("keras.src.backend.torch.optimizers.torch_adam", "Adam._parallel_update_step"): "8034ae3d81d00f24",
    ("keras.src.backend.common.variables", "Variable.assign_add"): "02093eccc2e3c4e7",
    ("keras.src.backend.common.variables", "Variable.assign"): "4fdea6a6244132ab",
}

_checked: dict[str, str | None] = {}


def source_hash(module: str, path: str) -> str | None:
    """The first 16 hex digits of the sha256 of ``module.path``'s source, or None where the
    name is missing or has no source."""
    try:
        obj = importlib.import_module(module)
        for part in path.split("."):
            obj = getattr(obj, part)
        src = inspect.getsource(obj)
    except (ImportError, AttributeError, OSError, TypeError):
        return None
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def _differs(table: dict) -> str | None:
    """The first entry of ``table`` whose source is missing or differs, as words, or None."""
    for (module, path), expected in table.items():
        got = source_hash(module, path)
        if got is None:
            return f"{module}.{path} is missing"
        if got != expected:
            return f"{module}.{path} differs from Keras {TESTED}'s"
    return None


def check(group: str) -> str | None:
    """Why ``group`` ("loop" or "forms") cannot be used with the Keras installed, or None;
    looked at once per process, and the first reason found is warned about once."""
    if group not in _checked:
        why = _differs(LOOP if group == "loop" else FORMS)
        _checked[group] = why
        if why is not None:
            import keras
            what = ("gyre.keras runs Keras's own fit" if group == "loop" else
                    "gyre.keras's lean fit uses Keras's own Dense, loss, metrics and optimizer")
            warnings.warn(f"{what}: the installed Keras {keras.__version__} is not the one it "
                          f"was written against ({why}; tested: Keras {TESTED}). Results are "
                          "Keras's; only the speed-up is lost.", UserWarning, stacklevel=3)
    return _checked[group]


def loop_ok() -> bool:
    return check("loop") is None


def forms_ok() -> bool:
    return check("forms") is None


def reset() -> None:
    """Forget the checks (tests that change Keras's functions call this)."""
    _checked.clear()
