"""loramux.v1: generated protobuf and gRPC modules of proto/loramux/v1/inference.proto.

Do not edit the *_pb2* files by hand: edit the .proto and run `make proto`.
"""
