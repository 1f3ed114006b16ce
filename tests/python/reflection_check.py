"""What a Python user sees through gRPC server reflection, printed as JSON.

usage: reflection_check.py HOST:PORT TOKEN

v1alpha through grpcio-reflection's own client (ProtoReflectionDescriptorDatabase + a
DescriptorPool, which speaks only v1alpha); v1 as grpcurl does it, a raw
/grpc.reflection.v1.ServerReflection/ServerReflectionInfo call (the v1 and v1alpha messages are
the same on the wire, so grpcio-reflection's message classes serve for both). Each runs once
without metadata and once with TOKEN as a bearer header. Also: what CampaignService.List answers
without and with TOKEN.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

METHODS = [
    ("distillery.v1.CampaignService", "Submit"),
    ("distillery.v1.CampaignService", "Watch"),
    ("distillery.v1.WorkerService", "PollTask"),
    ("grpc.health.v1.Health", "Check"),
]


class _Header(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds one metadata pair to every call."""

    def __init__(self, key: str, value: str) -> None:
        self.pair = (key, value)

    def _details(self, d: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        md = list(d.metadata or []) + [self.pair]
        return _Details(d.method, d.timeout, md, d.credentials, d.wait_for_ready, d.compression)

    def intercept_unary_unary(
        self, cont: Callable[..., Any], d: grpc.ClientCallDetails, req: Any
    ) -> Any:
        return cont(self._details(d), req)

    def intercept_stream_stream(
        self, cont: Callable[..., Any], d: grpc.ClientCallDetails, reqs: Iterator[Any]
    ) -> Any:
        return cont(self._details(d), reqs)


class _Details(grpc.ClientCallDetails):
    def __init__(
        self,
        method: str,
        timeout: float | None,
        metadata: Any,
        credentials: Any,
        wait_for_ready: bool | None,
        compression: Any,
    ) -> None:
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


def v1alpha(channel: grpc.Channel) -> dict[str, Any]:
    db = ProtoReflectionDescriptorDatabase(channel)
    pool = DescriptorPool(db)
    methods = {}
    for service, name in METHODS:
        m = pool.FindServiceByName(service).methods_by_name[name]
        methods[f"{service}.{name}"] = {
            "input": m.input_type.full_name,
            "output": m.output_type.full_name,
            "input_fields": [f.name for f in m.input_type.fields],
            "server_streaming": m.server_streaming,
        }
    return {"services": sorted(db.get_services()), "methods": methods}


def v1(channel: grpc.Channel) -> dict[str, Any]:
    call = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    reqs = [reflection_pb2.ServerReflectionRequest(list_services="")]
    reqs += [reflection_pb2.ServerReflectionRequest(file_containing_symbol=s) for s, _ in METHODS]
    services: list[str] = []
    files: list[descriptor_pb2.FileDescriptorProto] = []
    for resp in call(iter(reqs), timeout=10):
        kind = resp.WhichOneof("message_response")
        if kind == "list_services_response":
            services = sorted(s.name for s in resp.list_services_response.service)
        elif kind == "file_descriptor_response":
            for raw in resp.file_descriptor_response.file_descriptor_proto:
                files.append(descriptor_pb2.FileDescriptorProto.FromString(raw))
        else:
            raise SystemExit(f"v1 reflection answered {resp}")
    messages = {f".{f.package}.{m.name}": m for f in files for m in f.message_type}
    methods = {}
    for service, name in METHODS:
        package, short = service.rsplit(".", 1)
        svc = next(s for f in files if f.package == package for s in f.service if s.name == short)
        m = next(m for m in svc.method if m.name == name)
        methods[f"{service}.{name}"] = {
            "input": m.input_type.lstrip("."),
            "output": m.output_type.lstrip("."),
            "input_fields": [f.name for f in messages[m.input_type].field],
            "server_streaming": m.server_streaming,
        }
    return {"services": services, "methods": methods}


def list_code(channel: grpc.Channel) -> str:
    call: Any = channel.unary_unary("/distillery.v1.CampaignService/List")
    try:
        call(b"", timeout=10)
        return "OK"
    except grpc.RpcError as e:
        return e.code().name


def main() -> None:
    addr, token = sys.argv[1], sys.argv[2]
    out: dict[str, Any] = {}
    for label, header in [("no_token", None), ("with_token", f"Bearer {token}")]:
        channel = grpc.insecure_channel(addr)
        if header:
            channel = grpc.intercept_channel(channel, _Header("authorization", header))
        out[label] = {"v1alpha": v1alpha(channel), "v1": v1(channel), "list": list_code(channel)}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    # A hung coordinator fails the test instead of stalling the suite (SIGALRM ends the process).
    signal.alarm(60)
    main()
