"""The committed stubs match generate.proto and import under the versions we support."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path


from pagedray.protos import codegen, generate_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]


def _floor(requirement_name: str) -> tuple[int, ...]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if re.match(rf"{requirement_name}\s*>=", d))
    return tuple(int(x) for x in re.search(r">=\s*([\d.]+)", spec).group(1).split("."))


def test_stubs_do_not_drift_from_proto(tmp_path):
    fresh = codegen.generate(tmp_path)
    for name, text in fresh.items():
        committed = (codegen.PROTO_DIR / name).read_text()
        assert codegen.without_versions(committed) == codegen.without_versions(text), (
            f"{name} is stale: run `python -m pagedray.protos.codegen` with grpcio-tools 1.84.0 and commit")


def test_stub_versions_within_pinned_floors():
    """The stubs refuse to import under a runtime older than their generator; the GPU
    machines run grpcio 1.84 and protobuf 7.36, and pyproject's floors must admit them."""
    grpc_text = (codegen.PROTO_DIR / "generate_pb2_grpc.py").read_text()
    grpc_gen = tuple(int(x) for x in re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", grpc_text)
                     .group(1).split("."))
    pb_text = (codegen.PROTO_DIR / "generate_pb2.py").read_text()
    pb_gen = tuple(int(x) for x in re.search(
        r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+),", pb_text).groups())
    assert grpc_gen <= _floor("grpcio") <= (1, 84, 0)
    assert pb_gen <= _floor("protobuf") <= (7, 36, 0)


def test_grpc_stub_imports_package_relative():
    text = (codegen.PROTO_DIR / "generate_pb2_grpc.py").read_text()
    assert "from pagedray.protos import generate_pb2 as generate__pb2" in text
    from pagedray.protos import generate_pb2_grpc
    assert generate_pb2_grpc.GenerationStub


def test_contract_shape():
    """Field numbers are the wire contract other-language clients rely on."""
    fields = {f.name: (f.number, f.has_presence) for f in pb.SamplingParams.DESCRIPTOR.fields}
    assert fields["temperature"] == (1, True) and fields["seed"] == (15, True)
    assert fields["min_tokens"] == (6, False) and fields["repetition_penalty"] == (14, True)
    request = pb.GenerateRequest.DESCRIPTOR
    assert [o.name for o in request.oneofs] == ["input"]
    assert {f.name: f.number for f in request.fields} == {
        "model": 1, "prompt": 2, "prompt_token_ids": 3, "sampling": 4, "request_id": 5, "chat": 6,
        "lora_name": 20}
    info = {f.name: f.number for f in pb.ModelInfo.DESCRIPTOR.fields}
    assert info["name"] == 1 and info["parent"] == 20 and info["root"] == 21
    assert [f.name for f in request.oneofs_by_name["input"].fields] == ["prompt", "prompt_token_ids", "chat"]
    assert {f.name: f.number for f in pb.ChatMessage.DESCRIPTOR.fields} == {"role": 1, "content": 2}
    assert pb.FinishReason.Name(3) == "FINISH_REASON_ABORT"
    service = pb.DESCRIPTOR.services_by_name["Generation"]
    assert service.full_name == "pagedray.v1.Generation"
    assert service.methods_by_name["GenerateStream"].server_streaming


def test_unset_optionals_are_distinguishable_from_zero():
    s = pb.SamplingParams(temperature=0.0)
    assert s.HasField("temperature") and not s.HasField("top_p")
    round_trip = pb.SamplingParams.FromString(s.SerializeToString())
    assert round_trip.HasField("temperature") and round_trip.temperature == 0.0


def test_without_versions_sees_real_changes():
    text = (codegen.PROTO_DIR / "generate_pb2.py").read_text()
    assert codegen.without_versions(text) != codegen.without_versions(text.replace("prompt", "prompts"))
    bumped = text.replace("# Protobuf Python Version: 7.35.1", "# Protobuf Python Version: 9.0.0")
    assert codegen.without_versions(bumped) == codegen.without_versions(text)
