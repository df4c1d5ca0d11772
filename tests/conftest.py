import os
from pathlib import Path

import pytest


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


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
