"""Server reflection under both names clients ask for: `grpc.reflection.v1` and `v1alpha`.

grpcurl and newer gRPC clients ask `grpc.reflection.v1.ServerReflection` first; grpcio-reflection
ships only `v1alpha`. The two services are the same on the wire (v1 renamed the package, nothing
else), so one v1alpha servicer answers both: the v1 method is registered with the v1alpha message
codecs, and the v1 file descriptor (v1alpha's, renamed) is added to the default pool so that a
client can describe the v1 service too.

It knows reflection only; which services exist is the caller's to say.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import grpc.aio
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as v1alpha_grpc

V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"
V1_METHOD = f"/{V1_SERVICE_NAME}/ServerReflectionInfo"


def enable_reflection(service_names: Sequence[str], server: grpc.aio.Server) -> None:
    """Serve reflection (v1 and v1alpha) on `server` for `service_names` and both reflection services."""
    _add_v1_descriptor()
    names = [*service_names, reflection.SERVICE_NAME, V1_SERVICE_NAME]
    servicer = reflection.aio.ReflectionServicer(names)
    v1alpha_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=v1alpha_pb2.ServerReflectionRequest.FromString,
        response_serializer=v1alpha_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": handler}),)
    )


def _add_v1_descriptor() -> None:
    """Put v1's file descriptor (v1alpha's under the v1 package) in the default pool, once."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha_pb2.DESCRIPTOR.CopyToProto(proto)
    old_package = proto.package
    proto.name, proto.package = V1_FILE, V1_PACKAGE
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old_package, V1_PACKAGE)
            method.output_type = method.output_type.replace(old_package, V1_PACKAGE)
    for message in proto.message_type:
        for message_field in message.field:
            if message_field.type_name:
                message_field.type_name = message_field.type_name.replace(old_package, V1_PACKAGE)
    pool.Add(proto)
