"""The adapters an engine core's workers hold, and those they are parsing off the step loop.

A request naming an adapter the workers have not parsed starts its parse on a thread and waits in
the queue (the scheduler skips it; `loading` is the set it reads) while every other request keeps
stepping; `poll()`, once per step, reports the parses that finished, and a failed one refuses the
requests that waited for it. The offline API parses synchronously (`add_now`), so that `generate`
raises the adapter's ValueError itself.
"""
from __future__ import annotations

import concurrent.futures

from pagedray.common.lora import LoRARequest


class LoRALoads:
    def __init__(self, executor, enabled: bool) -> None:
        self.executor, self.enabled = executor, enabled
        self.ready: dict[int, LoRARequest] = {}
        self.loading: set[int] = set()          # lora_int_ids being parsed (the scheduler holds them back)
        self._futures: dict[int, tuple[LoRARequest, concurrent.futures.Future]] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def check(self, lora: LoRARequest) -> bool:
        """ValueError when LoRA is off or the id names another adapter; True when already parsed."""
        if not self.enabled:
            raise ValueError(f"request for LoRA adapter {lora.lora_name!r}: LoRA is not enabled "
                             "(start the engine with enable_lora=True / --enable-lora)")
        known = self.ready.get(lora.lora_int_id) or self._futures.get(lora.lora_int_id, (None,))[0]
        if known is not None and known != lora:
            raise ValueError(f"lora_int_id {lora.lora_int_id} is adapter {known.lora_name!r} at "
                             f"{known.lora_path!r}, not {lora.lora_name!r} at {lora.lora_path!r}")
        return lora.lora_int_id in self.ready

    def add_now(self, lora: LoRARequest) -> bool:
        """Parse on the workers now (ValueError naming what does not fit); False if already parsed."""
        if self.check(lora):
            return False
        entry = self._futures.get(lora.lora_int_id)
        if entry is not None:
            entry[1].result()   # raises its error
        else:
            self.executor.add_lora(lora)
        self._ready(lora)
        return True

    def start(self, lora: LoRARequest) -> None:
        """Parse on a thread unless parsed or being parsed."""
        if self.check(lora) or lora.lora_int_id in self._futures:
            return
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lora-load")
        self._futures[lora.lora_int_id] = (lora, self._pool.submit(self.executor.add_lora, lora))
        self.loading.add(lora.lora_int_id)

    def poll(self) -> list[tuple[LoRARequest, BaseException]]:
        """Finish the parses that are done; the failed ones with their errors."""
        failed = []
        for lid, (lora, future) in list(self._futures.items()):
            if not future.done():
                continue
            del self._futures[lid]
            self.loading.discard(lid)
            if future.exception() is None:
                self.ready[lid] = lora
            else:
                failed.append((lora, future.exception()))
        return failed

    def _ready(self, lora: LoRARequest) -> None:
        self._futures.pop(lora.lora_int_id, None)
        self.loading.discard(lora.lora_int_id)
        self.ready[lora.lora_int_id] = lora

    def remove(self, lora_int_id: int) -> bool:
        if self.ready.pop(lora_int_id, None) is None:
            return False
        return self.executor.remove_lora(lora_int_id)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
