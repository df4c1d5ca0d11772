"""A model directory -> its ModelArch and the decoder that runs it."""
from __future__ import annotations

from pathlib import Path

from loraxd.worker.models.arch import MODEL_TYPES, READERS, ModelArch, architecture_of, read_arch
from loraxd.worker.models.decoder import CausalLM
from loraxd.worker.models.hf_config import UnsupportedModel, read_config_json, read_hf_config

SUPPORTED_ARCHITECTURES = tuple(READERS)


def resolve(model_dir: str | Path) -> ModelArch:
    """The ModelArch of a model directory; UnsupportedModel when loraxd cannot run it
    exactly as transformers would."""
    architecture_of(read_config_json(model_dir))  # an unknown one is refused before reading
    return read_arch(read_hf_config(model_dir))


__all__ = ["MODEL_TYPES", "SUPPORTED_ARCHITECTURES", "CausalLM", "ModelArch",
           "UnsupportedModel", "architecture_of", "read_config_json", "resolve"]
