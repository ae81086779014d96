"""LoRAManager: which adapter sits in which device slot, and each step's token -> slot map.

Adapters are parsed once into host memory (`add_lora`; an LRU of max_cpu_loras, re-read from
disk if evicted and needed again) and copied into one of max_loras device slots when a step
uses them, evicting the least recently used slot no scheduled request needs (the scheduler
keeps a step's adapters within max_loras). A swap is a copy on the compute stream, ordered after
the step in flight: the other requests of the step go on in the same batch.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import torch

from pagedray.common.lora import LoRAConfig, LoRARequest
from pagedray.models.layers.lora import apply_lora
from pagedray.models.lora_adapter import LoRAWeights, load_lora_weights


class LoRAManager:
    def __init__(self, model: torch.nn.Module, config: LoRAConfig, max_num_tokens: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.model, self.config, self.dtype = model, config, dtype
        self.ctx, self.layers = apply_lora(model, config.max_loras, config.max_lora_rank, max_num_tokens,
                                           dtype, device)
        self.known: dict[int, LoRARequest] = {}             # added adapters, by lora_int_id
        self.host: OrderedDict[int, LoRAWeights] = OrderedDict()   # LRU, most recent last
        self.slot_of: OrderedDict[int, int] = OrderedDict()        # lora_int_id -> slot, LRU
        self.free_slots = list(range(config.max_loras - 1, -1, -1))
        self.num_swaps = 0   # adapters copied into a slot (tests and benchmarks read it)
        # A Ray rank is asked to add an adapter on another thread than the one running its steps.
        self._lock = threading.RLock()

    # -- adapters ----------------------------------------------------------------
    def add_lora(self, request: LoRARequest) -> bool:
        """Parse and cache the adapter (ValueError if it does not fit); False if it was known.

        The parse runs outside the lock: a step on another thread is not held up by it."""
        with self._lock:
            if self._is_known(request):
                return False
        weights = self._parse(request)
        with self._lock:
            self._cache(request.lora_int_id, weights)
            self.known[request.lora_int_id] = request
        return True

    def _is_known(self, request: LoRARequest) -> bool:
        old = self.known.get(request.lora_int_id)
        if old is not None and old.lora_path != request.lora_path:
            raise ValueError(f"lora_int_id {request.lora_int_id} is adapter {old.lora_name!r} at "
                             f"{old.lora_path!r}, not {request.lora_path!r}")
        return old is not None

    def remove_lora(self, lora_int_id: int) -> bool:
        with self._lock:
            return self._remove(lora_int_id)

    def _remove(self, lora_int_id: int) -> bool:
        if self.known.pop(lora_int_id, None) is None:
            return False
        self.host.pop(lora_int_id, None)
        slot = self.slot_of.pop(lora_int_id, None)
        if slot is not None:
            self.free_slots.append(slot)
        return True

    def list_loras(self) -> list[int]:
        return sorted(self.known)

    def _parse(self, request: LoRARequest) -> LoRAWeights:
        return load_lora_weights(request.lora_path, request.lora_name, self.layers,
                                 getattr(self.model, "config", None), self.config.max_lora_rank, self.dtype,
                                 model=self.model)

    def _cache(self, lora_int_id: int, weights: LoRAWeights) -> None:
        self.host[lora_int_id] = weights
        self.host.move_to_end(lora_int_id)
        while len(self.host) > self.config.max_cpu_loras:
            self.host.popitem(last=False)

    def _to_host(self, request: LoRARequest) -> LoRAWeights:
        """The parsed adapter (parsed again here, on the step, only if the host LRU dropped it)."""
        weights = self.host.get(request.lora_int_id)
        if weights is None:
            weights = self._parse(request)
        self._cache(request.lora_int_id, weights)
        return weights

    def _slot(self, lora_int_id: int, needed: set[int]) -> int:
        slot = self.slot_of.get(lora_int_id)
        if slot is not None:
            self.slot_of.move_to_end(lora_int_id)
            return slot
        if not self.free_slots:
            victim = next((i for i in self.slot_of if i not in needed), None)
            if victim is None:
                raise RuntimeError(f"a step needs more than max_loras={self.config.max_loras} adapters "
                                   "(the scheduler keeps a step within it)")
            self.free_slots.append(self.slot_of.pop(victim))
        slot = self.free_slots.pop()
        weights = self._to_host(self.known[lora_int_id])
        for name, layer in self.layers.items():
            layer.set_slot(slot, weights.layers.get(name))
        self.slot_of[lora_int_id] = slot
        self.num_swaps += 1
        return slot

    # -- steps ---------------------------------------------------------------------
    def set_step(self, lora_requests: list[LoRARequest | None], counts: list[int]) -> None:
        """Per scheduled sequence (in the flat batch's order): its adapter (or None) and token count.

        An adapter removed while requests of it still run is added back from their request."""
        with self._lock:
            self._set_step(lora_requests, counts)

    def _set_step(self, lora_requests: list[LoRARequest | None], counts: list[int]) -> None:
        needed = {r.lora_int_id: r for r in lora_requests if r is not None}
        if not needed:
            self.ctx.set_tokens(np.full(sum(counts), -1, dtype=np.int32))
            return
        for request in needed.values():
            if not self._is_known(request):
                self._cache(request.lora_int_id, self._parse(request))
                self.known[request.lora_int_id] = request
        slots = {lid: self._slot(lid, set(needed)) for lid in needed}
        per_seq = np.array([-1 if r is None else slots[r.lora_int_id] for r in lora_requests], dtype=np.int32)
        self.ctx.set_tokens(np.repeat(per_seq, counts))
