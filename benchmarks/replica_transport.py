"""What the hop between the serving front and an engine core costs, and what it is made of.

- `--engine`: the real engine core (Llama shapes of `--preset`, dummy weights) driven in this
  process (a plain `step()` loop: the engine's own speed), through a `ProcessClient` (core in a
  spawned subprocess, ZMQ ipc://) and through a `RayClient` (core in a Ray actor, ZMQ tcp://):
  output tokens/s for `--streams` concurrent greedy requests of `--tokens` tokens, and the
  driver's CPU seconds.
- `--encoding`: encode + decode time and size of a 256-request add batch and a 256-output step
  batch: msgspec msgpack structs (the wire) against pickle of the same structs, and against the
  old wire (a pickled per-request RequestOutput dataclass each step).
- `--transport`: a core-like sender process streams step batches (128 outputs) one way to an
  asyncio reader here: ZMQ ipc:// (zmq.asyncio) against a multiprocessing Pipe (fd on the loop):
  messages/s and reader CPU per message.

    python benchmarks/replica_transport.py --encoding --transport
    python benchmarks/replica_transport.py --engine --device cuda --preset 1b --tokens 128 --streams 1 32 128
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import pickle
import sys
import tempfile
import time

from ray_loopback import keep_ray_on_loopback

keep_ray_on_loopback()

import msgspec  # noqa: E402

from pagedray.cluster.core.messages import CoreOutput, CoreOutputs, CoreRequest, EngineStats  # noqa: E402
from pagedray.cluster.core.process import DEFAULT_CORE_FACTORY, freeze_heap, load_factory  # noqa: E402
from pagedray.common.sampling_params import SamplingParams  # noqa: E402

CLIENTS = ("ray", "process", "inproc")   # in-process last: the other two free their GPU memory on exit


RESULTS: list[dict] = []   # what --engine measured, for the record written at the end


def emit(record: dict) -> None:
    RESULTS.append(record)
    print(json.dumps(record), flush=True)


# -- encoding ---------------------------------------------------------------------------------
def step_batch(n: int) -> CoreOutputs:
    outs = [CoreOutput(f"req-{i:06d}", 0, [1000 + i]) for i in range(n)]
    return CoreOutputs(outs, EngineStats(num_running=n), time.time())


def add_batch(n: int, prompt_len: int = 256) -> list[CoreRequest]:
    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=256, seed=1)
    return [CoreRequest(f"req-{i:06d}", list(range(i, i + prompt_len)), params) for i in range(n)]


def old_wire(n: int) -> list:
    """What RayReplica's poll returned per step: (id, kind, RequestOutput delta, head) per request."""
    from pagedray.cluster.outputs import CompletionOutput, RequestOutput
    return [(f"req-{i:06d}", "out", RequestOutput(f"req-{i:06d}", None, [], [CompletionOutput(0, " tok", [1000 + i])],
                                                 metrics={"arrival_time": 1.0}), False) for i in range(n)]


def _time(fn, repeat: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat * 1e6


def bench_encoding(n: int = 256, repeat: int = 200) -> None:
    enc = msgspec.msgpack.Encoder()
    for what, obj, typ in (("add batch", add_batch(n), list[CoreRequest]), ("step batch", step_batch(n), CoreOutputs)):
        dec = msgspec.msgpack.Decoder(typ)
        blob, pblob = enc.encode(obj), pickle.dumps(obj, protocol=5)
        emit({"encoding": what, "requests": n,
              "msgspec_us": round(_time(lambda: dec.decode(enc.encode(obj)), repeat), 1),
              "msgspec_bytes": len(blob),
              "pickle_us": round(_time(lambda: pickle.loads(pickle.dumps(obj, protocol=5)), repeat), 1),
              "pickle_bytes": len(pblob)})
    old = old_wire(n)
    emit({"encoding": "step batch, old wire (pickled RequestOutput per request)", "requests": n,
          "pickle_us": round(_time(lambda: pickle.loads(pickle.dumps(old, protocol=5)), repeat), 1),
          "pickle_bytes": len(pickle.dumps(old, protocol=5))})


# -- transport --------------------------------------------------------------------------------
def _sender(kind: str, target, count: int) -> None:
    payload = msgspec.msgpack.encode(step_batch(128))
    if kind == "zmq":
        import zmq
        sock = zmq.Context().socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.bind(target)
        for _ in range(count):
            sock.send_multipart([b"o", payload], copy=False)
        sock.close(linger=-1)
    else:
        for _ in range(count):
            target.send_bytes(payload)
        target.close()


async def _receive_zmq(address: str, count: int, dec) -> None:
    import zmq
    import zmq.asyncio
    sock = zmq.asyncio.Context().socket(zmq.PULL)
    sock.connect(address)
    for _ in range(count):
        frames = await asyncio.wait_for(sock.recv_multipart(copy=False), 10)
        dec.decode(frames[1].buffer)
    sock.close()


async def _receive_pipe(conn, count: int, dec) -> None:
    loop, done, got = asyncio.get_running_loop(), asyncio.Event(), [0]

    def readable() -> None:
        while got[0] < count and conn.poll():
            dec.decode(conn.recv_bytes())
            got[0] += 1
        if got[0] == count:
            done.set()

    loop.add_reader(conn.fileno(), readable)
    await done.wait()
    loop.remove_reader(conn.fileno())


def bench_transport(count: int = 20_000) -> None:
    ctx = multiprocessing.get_context("spawn")
    dec = msgspec.msgpack.Decoder(CoreOutputs)
    for kind in ("zmq", "pipe"):
        if kind == "zmq":
            target = f"ipc://{tempfile.mkdtemp()}/bench"
            receive = _receive_zmq(target, count, dec)
            child = ctx.Process(target=_sender, args=(kind, target, count))
        else:
            reader, writer = ctx.Pipe(duplex=False)
            receive = _receive_pipe(reader, count, dec)
            child = ctx.Process(target=_sender, args=(kind, writer, count))
        child.start()
        cpu0, t0 = time.process_time(), time.perf_counter()
        asyncio.run(receive)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        child.join()
        emit({"transport": kind, "messages": count, "outputs_per_message": 128,
              "messages_per_s": round(count / wall), "reader_cpu_us_per_message": round(cpu / count * 1e6, 1)})


# -- the engine through each client -------------------------------------------------------------
def _requests(streams: int, tokens: int, tag: str) -> list[CoreRequest]:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    return [CoreRequest(f"{tag}-{i}", [5 + i, 7, 9, 11], params) for i in range(streams)]


def _result(kind: str, streams: int, tokens: int, produced: int, wall: float, cpu: float) -> dict:
    if produced != streams * tokens:
        raise AssertionError(f"{kind}: {produced} tokens arrived, {streams * tokens} were produced")
    return {"client": kind, "streams": streams, "tokens_per_s": round(produced / wall, 1),
            "ms_per_token_per_stream": round(wall / tokens * 1e3, 3), "tokens": produced,
            "driver_cpu_s": round(cpu, 3)}


def run_inproc(core, streams: int, tokens: int) -> dict:
    requests = _requests(streams, tokens, f"i{time.perf_counter_ns()}")
    cpu0, t0 = time.process_time(), time.perf_counter()
    core.add(requests)
    produced = 0
    while core.has_unfinished_requests():
        produced += sum(len(o.new_token_ids) for o in core.step().outputs)
    return _result("inproc", streams, tokens, produced, time.perf_counter() - t0, time.process_time() - cpu0)


async def run_client(kind: str, client, streams: int, tokens: int) -> dict:
    requests = _requests(streams, tokens, f"c{time.perf_counter_ns()}")
    want = {r.request_id for r in requests}
    cpu0, t0 = time.process_time(), time.perf_counter()
    await client.add(requests)
    produced, finished = 0, 0
    async for batch in client.outputs():
        for out in batch.outputs:
            if out.request_id in want:
                produced += len(out.new_token_ids)
                finished += out.finish_reason is not None
        if finished == streams:
            break
    return _result(kind, streams, tokens, produced, time.perf_counter() - t0, time.process_time() - cpu0)


def _median(runs: list[dict]) -> dict:
    """The run of median throughput, with every run's figure beside it (a single short run at 128
    streams is ~0.3 s on a GPU: one host hiccup moved it by a third; see RESULTS.md)."""
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
    return {**ordered[len(ordered) // 2], "runs_tokens_per_s": [r["tokens_per_s"] for r in runs]}


async def _bench_clients(args, path: str, kw: dict) -> None:
    from pagedray.cluster.serving.process_client import ProcessClient
    from pagedray.cluster.serving.ray_client import RayClient
    for kind in [k for k in CLIENTS if k in args.clients and k != "inproc"]:
        if kind == "ray":
            client = RayClient(path, kw, name="bench", core_factory=args.core_factory,
                               num_threads=args.ray_threads)
        else:
            client = ProcessClient(path, kw, name="bench", core_factory=args.core_factory)
        await client.start()
        freeze_heap()   # as `pagedray serve` does once started: see process.freeze_heap
        for streams in args.streams:
            await run_client(kind, client, streams, 8)   # warm-up (graphs, allocator)
            runs = [await run_client(kind, client, streams, args.tokens) for _ in range(args.repeats)]
            emit({"device": args.device, "preset": args.preset, **_median(runs)})
        await client.shutdown()


def bench_engine(args) -> None:
    from ray_step_overhead import make_model_dir
    path = make_model_dir(tempfile.mkdtemp(), args.preset, weights=False)
    kw = dict(device=args.device, load_format="dummy", max_model_len=2048, gpu_memory_utilization=0.5,
              **json.loads(args.core_kwargs))
    if "ray" in args.clients:
        import ray
        ray.init(include_dashboard=False, log_to_driver=False)
    asyncio.run(_bench_clients(args, path, kw))
    if "inproc" in args.clients:
        core = load_factory(args.core_factory)(path, **kw)
        freeze_heap()   # as the engine-core process and actor do once built
        for streams in args.streams:
            run_inproc(core, streams, 8)
            runs = [run_inproc(core, streams, args.tokens) for _ in range(args.repeats)]
            emit({"device": args.device, "preset": args.preset, **_median(runs)})
        core.shutdown()
    if args.core_factory == DEFAULT_CORE_FACTORY:
        record_engine(args)


def record_engine(args) -> None:
    """One record (benchmarks/records/) for the most streams: each client against in-process."""
    import common
    streams = max(args.streams)
    by_client = {r["client"]: r for r in RESULTS if r.get("streams") == streams and "client" in r}
    base = by_client.get("inproc")
    if base is None:
        return
    names = {"ray": "RayClient", "process": "ProcessClient"}
    figures = {}
    for kind in ("ray", "process"):
        if kind in by_client:
            figures[f"{names[kind]} / in-process"] = f"{by_client[kind]['tokens_per_s'] / base['tokens_per_s']:.2f}x"
    for kind in ("ray", "process", "inproc"):
        if kind in by_client:
            label = names.get(kind, "in-process")
            figures[f"{label} tok/s"] = round(by_client[kind]["tokens_per_s"])
            figures[f"{label} runs (tok/s)"] = " / ".join(f"{x:,.0f}" for x in by_client[kind]["runs_tokens_per_s"])
    model = "~1B Llama" if args.preset == "1b" else f"{args.preset} Llama"
    common.record(f"{model}, {streams} streams x {args.tokens} tokens", figures,
                  headline=next(iter(figures)) if figures else None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", action="store_true", help="in-process vs ProcessClient vs RayClient")
    ap.add_argument("--encoding", action="store_true", help="msgspec vs pickle for a 256-request batch")
    ap.add_argument("--transport", action="store_true", help="ZMQ ipc vs multiprocessing Pipe")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--clients", nargs="+", default=list(CLIENTS), choices=CLIENTS)
    ap.add_argument("--core-factory", default=DEFAULT_CORE_FACTORY)
    ap.add_argument("--core-kwargs", default="{}", help="JSON: more keywords for the core (e.g. a fake "
                    "core's step_delay_s, standing in for a GPU step that releases the GIL)")
    ap.add_argument("--repeats", type=int, default=5, help="measured runs per point (the median is reported)")
    ap.add_argument("--ray-threads", type=int, default=None,
                    help="torch threads of the Ray actor's engine (default: RayClient's choice)")
    args = ap.parse_args()
    if not (args.engine or args.encoding or args.transport):
        ap.error("pick at least one of --engine, --encoding, --transport")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if args.encoding:
        bench_encoding()
    if args.transport:
        bench_transport()
    if args.engine:
        bench_engine(args)


if __name__ == "__main__":
    main()
