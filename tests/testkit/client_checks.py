"""Checks shared by the ProcessClient and RayClient tests: drive a client, collect its tokens."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from testkit.core_fakes import fake_token

from pagedray.cluster.core.messages import CoreOutputs, CoreRequest
from pagedray.cluster.serving.engine_client import EngineClient
from pagedray.common.errors import EngineDeadError
from pagedray.common.sampling_params import SamplingParams

FAKE_CORE = "testkit.core_fakes:FakeCore.from_kwargs"   # core factory of the fake core (tests/testkit/core_fakes.py)


def requests(n: int, max_tokens: int, prefix: str = "r") -> list[CoreRequest]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [CoreRequest(f"{prefix}{i}", [5 + i, 7, 9, 11 + i], params) for i in range(n)]


def expected(req: CoreRequest, vocab: int = 320) -> list[int]:
    """The fake core's tokens for `req`."""
    return [fake_token(req.prompt_token_ids, k, vocab) for k in range(req.params.max_tokens)]


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


async def check_stop_is_found(client: EngineClient, max_tokens: int, within_s: float, gone_s: float) -> float:
    """SIGSTOP of the core with 4 requests in flight: outputs() ends with "sent nothing" within
    `within_s`, the stopped core is killed (gone within `gone_s`), new work is refused. Seconds taken."""
    await client.add(requests(4, max_tokens))
    os.kill(client.pid, signal.SIGSTOP)
    elapsed, error = await time_to_death(client, within_s)
    assert "sent nothing" in str(error)
    assert wait_gone(client.pid, gone_s), "a hung core is killed, not left stopped"
    with pytest.raises(EngineDeadError):
        await client.add(requests(1, 2))
    return elapsed


async def check_kill_is_found(client: EngineClient, max_tokens: int, within_s: float, cause: str) -> None:
    """SIGKILL of the core with 4 requests in flight: outputs() ends within `within_s` (well inside the
    liveness bound the caller sets: found by the death itself) with `cause`; the socket folder is removed."""
    await client.add(requests(4, max_tokens))
    os.kill(client.pid, signal.SIGKILL)
    _, error = await time_to_death(client, within_s)
    assert cause in str(error)
    assert not os.path.exists(client._ipc_dir), "a dead core's socket folder is removed"


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


def record(results: dict, batch: CoreOutputs) -> None:
    """Fold one step's outputs into {(request_id, index): {tokens, logprobs, finish, error}}."""
    for out in batch.outputs:
        entry = results.setdefault((out.request_id, out.index),
                                   {"tokens": [], "logprobs": [], "finish": None, "error": None})
        entry["tokens"].extend(out.new_token_ids)
        entry["logprobs"].extend(out.new_logprobs or [])
        entry["finish"], entry["error"] = out.finish_reason, out.error


def run_core(core, batch: list[CoreRequest]) -> dict:
    """The reference: the core stepped in this process until everything finished."""
    results: dict = {}
    core.add(batch)
    while core.has_unfinished_requests():
        record(results, core.step())
    return results


async def run_client(client: EngineClient, batch: list[CoreRequest], timeout_s: float = 300) -> dict:
    """The same through a client: until every request (all its completions) finished."""
    results: dict = {}
    n = {r.request_id: r.params.n for r in batch}

    def finished() -> bool:
        done: dict[str, int] = {}
        for (rid, _), entry in results.items():
            if entry["finish"] is not None:
                done[rid] = done.get(rid, 0) + 1
        return all(done.get(rid, 0) >= (1 if results.get((rid, 0), {}).get("error") else k)
                   for rid, k in n.items())

    async def read() -> None:
        await client.add(batch)
        async for step in client.outputs():
            record(results, step)
            if finished():
                return

    await asyncio.wait_for(read(), timeout_s)
    return results


def assert_same_outputs(got: dict, want: dict, atol: float = 1e-4) -> None:
    """Identical tokens, finish reasons and errors; logprobs equal to `atol`."""
    assert got.keys() == want.keys()
    for key, w in want.items():
        g = got[key]
        assert (g["tokens"], g["finish"], g["error"]) == (w["tokens"], w["finish"], w["error"]), key
        assert len(g["logprobs"]) == len(w["logprobs"]), key
        for gs, ws in zip(g["logprobs"], w["logprobs"]):
            assert [t for t, _, _ in gs] == [t for t, _, _ in ws], key
            assert all(abs(a - b) <= atol for (_, a, _), (_, b, _) in zip(gs, ws)), key


def assert_closed(client) -> None:
    """A client whose start() failed or was cancelled holds nothing open: its ZMQ context is
    destroyed (garbage collection of a live one can block pytest's exit for good) and its IPC
    folder is gone."""
    import os
    context = getattr(client, "_context", None)
    assert context is None or context.closed, f"{client.name}: ZMQ context left open"
    ipc_dir = getattr(client, "_ipc_dir", None)
    assert ipc_dir is None or not os.path.exists(ipc_dir), f"{client.name}: {ipc_dir} left behind"


async def cancel_mid_start(client) -> None:
    """Start `client`, cancel the start once its core is being built (process or actor made)."""
    import asyncio
    task = asyncio.ensure_future(client.start())
    while getattr(client, "process", None) is None and getattr(client, "actor", None) is None:
        assert not task.done(), "start() ended before the core was made"
        await asyncio.sleep(0.01)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return
    raise AssertionError("start() swallowed its cancellation")
