"""gRPC requests shared by the server tests: one builder, one stream reader, and the cases
written once for gRPC and once for the offline API (tests compare the two)."""
from __future__ import annotations

import grpc

from pagedray.cluster import SamplingParams
from pagedray.protos import generate_pb2 as pb


def make_request(prompt, request_id: str = "", **sampling) -> pb.GenerateRequest:
    """A GenerateRequest from a text prompt or a list of token ids."""
    request = pb.GenerateRequest(sampling=pb.SamplingParams(**sampling), request_id=request_id)
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.prompt_token_ids.ids.extend(prompt)
    return request


async def read_stream(call) -> list[pb.GenerateResponse]:
    messages = []
    while (message := await call.read()) is not grpc.aio.EOF:
        messages.append(message)
    return messages


# The same requests, written once for gRPC and once for the offline API.
CASES = [
    (make_request("The capital of France is", temperature=0.8, seed=1, max_tokens=12),
     "The capital of France is", SamplingParams(temperature=0.8, seed=1, max_tokens=12)),
    (make_request([5, 17, 99, 250], temperature=0.0, max_tokens=10, logprobs=3),
     {"prompt_token_ids": [5, 17, 99, 250]}, SamplingParams(temperature=0.0, max_tokens=10, logprobs=3)),
    (make_request("Hello, my name is", seed=7, n=2, max_tokens=9),
     "Hello, my name is", SamplingParams(seed=7, n=2, max_tokens=9)),
    (make_request("Once upon a time", temperature=0.9, top_k=20, seed=3, max_tokens=16, stop=["e", "a"]),
     "Once upon a time", SamplingParams(temperature=0.9, top_k=20, seed=3, max_tokens=16, stop=["e", "a"])),
    (make_request("héllo wörld 日本語", temperature=0.7, top_p=0.9, min_p=0.05, seed=11, max_tokens=14, min_tokens=4,
              repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3, logprobs=0),
     "héllo wörld 日本語", SamplingParams(temperature=0.7, top_p=0.9, min_p=0.05, seed=11, max_tokens=14,
                                        min_tokens=4, repetition_penalty=1.2, presence_penalty=0.5,
                                        frequency_penalty=0.3, logprobs=0)),
    # Every optional unset but the seed: vLLM's defaults (temperature 1, max_tokens 16, ...).
    (make_request("Paris", seed=5), "Paris", SamplingParams(seed=5)),
]

