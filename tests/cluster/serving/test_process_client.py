"""ProcessClient: an engine core in a subprocess, with the fake core (tests/testkit/core_fakes.py).

Liveness bounds are small here (3 s) so hangs are found quickly; the waits around them are
generous multiples (no timing assertions beyond "within a few bounds").
"""
from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap

import pytest

from testkit.client_checks import FAKE_CORE as FAKE
from testkit.client_checks import (assert_closed, cancel_mid_start, check_kill_is_found, check_stop_is_found,
                                   collect, expected, requests, time_to_death, wait_gone)
from testkit.core_fakes import fake_token

from pagedray.cluster.core.messages import CoreRequest
from pagedray.cluster.core.process import Wire
from pagedray.common.errors import EngineDeadError
from pagedray.cluster.serving.process_client import ProcessClient
from pagedray.common.sampling_params import SamplingParams

BOUND = 3.0


def fake_client(liveness_s: float = BOUND, **kwargs) -> ProcessClient:
    return ProcessClient("fake-model", kwargs, core_factory=FAKE, liveness_s=liveness_s, startup_timeout_s=120)


async def _with_client(body, liveness_s: float = BOUND, **kwargs):
    client = fake_client(liveness_s, **kwargs)
    await client.start()
    try:
        return await body(client)
    finally:
        await client.shutdown()


def test_tokens_stats_and_idle_heartbeat():
    async def body(client):
        assert client.info.model == "fake-model" and client.info.vocab_size == 320
        batch = requests(8, 12)
        await client.add(batch)
        got = await collect(client, {r.request_id for r in batch})
        assert got == {r.request_id: expected(r) for r in batch}
        await asyncio.sleep(3 * BOUND)          # idle for longer than the bound: heartbeats keep it alive
        assert client.dead_error is None
        stats = await client.get_stats()
        assert stats.generation_tokens_total == 8 * 12 and stats.num_running == 0
        # Thousands of fast steps: frames queue up and are drained in bursts; none may be lost.
        more = requests(2, 3000, prefix="late")
        await client.add(more)
        assert await collect(client, {r.request_id for r in more}) == {r.request_id: expected(r) for r in more}
    asyncio.run(_with_client(body))


def test_abort_and_migrated_request_continue():
    async def body(client):
        params = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
        await client.add([CoreRequest("long", [3, 4], params)])
        await client.abort(["long", "unknown-id"])
        # A request that already produced 3 tokens elsewhere continues from position 3.
        moved = CoreRequest("moved", [8, 9], SamplingParams(temperature=0, max_tokens=6), output_token_ids=[1, 2, 3])
        await client.add([moved])
        got = await collect(client, {"moved"})
        assert got["moved"] == [fake_token([8, 9], k, 320) for k in range(3, 6)]
        assert (await client.get_stats()).num_running == 0   # "long" was aborted
    asyncio.run(_with_client(body))


def test_bad_input_does_not_kill_the_core():
    async def body(client):
        # Refused by the core: comes back as an aborted output with the reason.
        bad = CoreRequest("bad", [10_000], SamplingParams(max_tokens=3))
        good = requests(1, 4, prefix="ok")[0]
        await client.add([bad, good])
        got = await collect(client, {"bad", "ok0"})
        assert got["bad"][0] == "error" and "prompt_token_ids" in got["bad"][1]
        assert got["ok0"] == expected(good)
        # Garbage on the wire: a frame that does not decode, an unknown kind, an empty message,
        # a batch with one undecodable request (refused by id) next to a good one.
        client._in.send_multipart([Wire.ADD, b"\xff\x00garbage"])
        client._in.send_multipart([b"?", b""])
        client._in.send_multipart([b""])
        client._in.send_multipart([Wire.ABORT, b"\x93"])
        import msgspec
        mixed = msgspec.msgpack.encode([["broken", "not-a-token-list", {}], good_again := requests(1, 3, "ok2")[0]])
        client._in.send_multipart([Wire.ADD, mixed])
        got = await collect(client, {"broken", "ok20"})
        assert got["broken"][0] == "error"
        assert got["ok20"] == expected(good_again)
        assert client.dead_error is None and (await client.get_stats()).num_running == 0
        with pytest.raises(TypeError):
            await client.add([object()])          # cannot be encoded: refused on this side
    asyncio.run(_with_client(body))


def test_sigstop_is_detected_within_the_bound():
    async def body(client):
        return await check_stop_is_found(client, 10_000, within_s=6 * BOUND, gone_s=10)
    asyncio.run(_with_client(body, step_delay_s=0.01))


def test_sigkill_is_detected_at_once():
    async def body(client):
        # Well inside the 30 s liveness bound: the process sentinel is on the event loop.
        await check_kill_is_found(client, 10_000, within_s=10, cause="killed by signal 9")
    asyncio.run(_with_client(body, liveness_s=30, step_delay_s=0.01))


def test_step_failure_reports_the_cause():
    async def body(client):
        await client.add([CoreRequest("boom", [99, 1], SamplingParams(max_tokens=5))])
        _, error = await time_to_death(client, 30)
        assert "fake executor failure" in str(error)
    asyncio.run(_with_client(body, crash_token=99))


def test_start_up_value_error_is_a_value_error():
    async def body():
        client = fake_client(no_such_setting=1)   # FakeCore(...) raises TypeError
        with pytest.raises(EngineDeadError, match="no_such_setting"):
            await client.start()
        assert wait_gone(client.pid, 15)
        client = fake_client(vocab_size=0)        # a bad setting: the caller's ValueError
        with pytest.raises(ValueError, match="vocab_size must be >= 1, got 0"):
            await client.start()
        assert wait_gone(client.pid, 15)
        assert_closed(client)
    asyncio.run(body())


def test_a_cancelled_start_and_a_failed_sibling_leave_nothing_open():
    """No hang at the end of a run: a start cancelled mid-way reaps its core and closes its wire;
    Frontend.start_with shuts every client down when one of them fails to start."""
    from pagedray.cluster.serving.frontend import Frontend

    async def body():
        client = fake_client()
        await cancel_mid_start(client)
        assert wait_gone(client.pid, 15)
        assert_closed(client)
        good, bad = fake_client(), fake_client(vocab_size=0)
        with pytest.raises(ValueError, match="vocab_size must be >= 1"):
            await Frontend.start_with([good, bad])
        for c in (good, bad):
            assert wait_gone(c.pid, 15)
            assert_closed(c)
    asyncio.run(body())


def test_core_dies_with_its_parent(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import asyncio, sys, time
        sys.path[:0] = {sys.path!r}
        from pagedray.cluster.serving.process_client import ProcessClient
        async def main():
            client = ProcessClient("m", {{}}, core_factory={FAKE!r}, liveness_s=5)
            await client.start()
            print(client.pid, flush=True)
            await asyncio.sleep(600)
        if __name__ == "__main__":   # spawn re-imports the main module
            asyncio.run(main())
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        core_pid = int(parent.stdout.readline())
        assert not wait_gone(core_pid, 0.5)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert wait_gone(core_pid, 10), f"core {core_pid} outlived its SIGKILLed parent"
    finally:
        parent.kill()


def test_bad_settings_are_value_errors(monkeypatch):
    from pagedray.common import envs
    monkeypatch.setenv("PAGEDRAY_ENGINE_LIVENESS_S", "0")
    with pytest.raises(ValueError, match="PAGEDRAY_ENGINE_LIVENESS_S must be > 0 seconds, got 0"):
        ProcessClient("m")
    monkeypatch.setenv("PAGEDRAY_ENGINE_THREADS", "two")
    with pytest.raises(ValueError, match="PAGEDRAY_ENGINE_THREADS must be an integer >= 1, got 'two'"):
        envs.engine_threads()
