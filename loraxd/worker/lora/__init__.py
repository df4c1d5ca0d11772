"""LoRA on the worker: PEFT loading, the device slot pool, batched heterogeneous LoRA ops."""

from loraxd.worker.lora.ops import TorchLoraOp
from loraxd.worker.lora.peft_format import AdapterIncompatible, LoraAdapter, load_peft_adapter
from loraxd.worker.lora.slots import LoraSlotPool
from loraxd.worker.lora.storage import GROUP_MODULES, MODULE_GROUP, LoraOp, LoraStepContext

__all__ = [
    "GROUP_MODULES", "MODULE_GROUP", "AdapterIncompatible", "LoraAdapter", "LoraOp",
    "LoraSlotPool", "LoraStepContext", "TorchLoraOp", "load_peft_adapter",
]
