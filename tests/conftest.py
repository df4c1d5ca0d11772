import os
from pathlib import Path

import pytest


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_configure(config):
    # Without CUDA the Triton kernel tests run in Triton's interpreter, which must be on
    # before triton is first imported (torch and transformers import it when installed);
    # with CUDA they run compiled, so it stays off.
    if not _has_cuda():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The converted default model, as `loraxd --download-only` leaves it (scripts/test)."""
    path = os.environ.get("LORAXD_TEST_MODEL_DIR")
    if not path or not Path(path, "model.safetensors").exists():
        pytest.skip("the default model is not converted (run scripts/setup)")
    return Path(path)
