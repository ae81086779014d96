"""Checks shared by the ProcessClient and RayClient tests: drive a client, collect its tokens."""
from __future__ import annotations

import asyncio
import time

from pagedray.cluster.core.messages import CoreOutputs, CoreRequest
from pagedray.cluster.serving.engine_client import EngineClient, EngineDeadError
from pagedray.workers.sampling_params import SamplingParams


def requests(n: int, max_tokens: int, prefix: str = "r") -> list[CoreRequest]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [CoreRequest(f"{prefix}{i}", [5 + i, 7, 9, 11 + i], params) for i in range(n)]


async def collect(client: EngineClient, want: set[str], timeout_s: float = 120) -> dict[str, list[int]]:
    """Tokens per request until every id in `want` finished; errors recorded as ['error', text]."""
    tokens: dict[str, list] = {rid: [] for rid in want}
    done: set[str] = set()

    async def read() -> None:
        async for batch in client.outputs():
            assert isinstance(batch, CoreOutputs)
            assert len({(o.request_id, o.index) for o in batch.outputs}) == len(batch.outputs), \
                "one output per completion per step"
            for out in batch.outputs:
                if out.request_id not in want:
                    continue
                if out.error is not None:
                    tokens[out.request_id] = ["error", out.error]
                else:
                    tokens[out.request_id].extend(out.new_token_ids)
                if out.finish_reason is not None:
                    done.add(out.request_id)
            if done == want:
                return

    await asyncio.wait_for(read(), timeout_s)
    return tokens


async def time_to_death(client: EngineClient, timeout_s: float) -> tuple[float, EngineDeadError]:
    """Seconds until `outputs()` raises EngineDeadError (the error), reading everything before it."""
    t0 = time.monotonic()

    async def read() -> EngineDeadError:
        try:
            async for _ in client.outputs():
                pass
        except EngineDeadError as exc:
            return exc
        raise AssertionError("outputs() ended without EngineDeadError")

    error = await asyncio.wait_for(read(), timeout_s)
    assert client.dead_error is error
    return time.monotonic() - t0, error


def gone(pid: int) -> bool:
    """True once `pid` no longer runs (absent, or a zombie nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        time.sleep(0.1)
    return gone(pid)
