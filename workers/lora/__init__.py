"""Multi-LoRA on a worker: adapter slots on the device, refilled from a host LRU cache."""
from pagedray.workers.lora.manager import LoRAManager

__all__ = ["LoRAManager"]
