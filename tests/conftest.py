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
