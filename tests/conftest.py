import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _static_backend_choice(tmp_path_factory):
    """The suite runs ``backend="auto"`` on the static rule (GYRE_AUTOTUNE=0: results must not
    depend on timings) and keeps any autotune cache out of the home directory; the autotuner's
    own tests turn it on."""
    import os

    old = {k: os.environ.get(k) for k in ("GYRE_AUTOTUNE", "GYRE_CACHE_DIR")}
    os.environ["GYRE_AUTOTUNE"] = "0"
    os.environ["GYRE_CACHE_DIR"] = str(tmp_path_factory.mktemp("gyre-cache"))
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def italy_run(tmp_path_factory):
    """One small trained classify run (italy_power_demand, 1-layer LSTM of 16, forward only)
    that the deployment tests (export, prune, quantize) copy instead of each training its own."""
    from gyre.tasks import classify
    out = tmp_path_factory.mktemp("italy") / "run"
    with _one_thread():
        classify.train(classify.Config(data="italy_power_demand", out=str(out), epochs=2, hidden=16,
                                       model="rnn", bidirectional=False, cell="lstm", dtw=False,
                                       minirocket=False, progress=False, tensorboard=False,
                                       device="cpu"))
    return out


@pytest.fixture(scope="session")
def airline_run(tmp_path_factory):
    """One small trained forecast run (airline, LSTM of 8, seasonal residual, the naive baseline
    only, the network alone: what export, serve and quantize take) that the deployment tests
    (export, quantize) copy."""
    from gyre.tasks import forecast
    out = tmp_path_factory.mktemp("airline") / "run"
    with _one_thread():
        forecast.train(forecast.Config(data="airline", out=str(out), hidden=8, epochs=2,
                                       patience=0, residual="seasonal", baselines=["naive"],
                                       ensemble=1, refit=False, combine="none",
                                       progress=False, tensorboard=False, device="cpu"))
    return out


class _one_thread:
    """Train the shared runs on one torch thread (two threads on two busy cores wait on each
    other far longer than they compute)."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)
