"""The committed generated code matches proto/tandem.proto in what it means.

What matters is the schema: every message, field, enum and service the .proto
declares, compared as protoc's FileDescriptorProto against the one the
committed tandem_pb2.py registers, and the stubs tandem_pb2_grpc.py makes for
each RPC. The generated text also carries the generator's version (grpc's
GRPC_GENERATED_VERSION, protobuf's runtime check), which moves with every
grpcio-tools release without changing a byte on the wire: comparing text
would fail for that alone, so the text is not compared.
"""
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from proto import tandem_pb2, tandem_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


def _declared(tmp_path) -> descriptor_pb2.FileDescriptorProto:
    pytest.importorskip("grpc_tools", reason="grpcio-tools comes with the [dev] extra")
    out = tmp_path / "tandem.desc"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--descriptor_set_out={out}",
                    "proto/tandem.proto"], cwd=ROOT, check=True)
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    assert len(fds.file) == 1
    return _without_json_names(fds.file[0])


def _without_json_names(f: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """protoc's descriptor set spells out each field's JSON name (derived from its name);
    the code it generates leaves it out."""
    def strip(messages):
        for m in messages:
            for field in m.field:
                field.ClearField("json_name")
            strip(m.nested_type)
    strip(f.message_type)
    return f


def test_generated_schema_matches_the_proto(tmp_path):
    declared = _declared(tmp_path)
    committed = _without_json_names(descriptor_pb2.FileDescriptorProto.FromString(tandem_pb2.DESCRIPTOR.serialized_pb))
    if committed != declared:
        names = lambda f: sorted(m.name for m in f.message_type)   # noqa: E731
        raise AssertionError("proto/tandem_pb2.py does not match proto/tandem.proto "
                             f"(messages {names(committed)} vs {names(declared)}): run `make proto` and commit")


def test_grpc_stubs_cover_every_rpc(tmp_path):
    declared = _declared(tmp_path)
    for service in declared.service:
        stub = getattr(tandem_pb2_grpc, f"{service.name}Stub")
        servicer = getattr(tandem_pb2_grpc, f"{service.name}Servicer")
        for method in service.method:
            assert hasattr(servicer, method.name), f"{service.name}Servicer lacks {method.name}: run `make proto`"
            assert f"/{declared.package}.{service.name}/{method.name}" in Path(
                tandem_pb2_grpc.__file__).read_text(), f"no stub path for {method.name}: run `make proto`"
        assert stub is not None
