"""The OpenAI-compatible HTTP shim: a FastAPI app that is a gRPC client of `loramux.v1.Inference`.

`create_app(grpc_target)` builds the app; `HttpServer` runs it under uvicorn on an event loop
the caller owns (the one `loramux serve` also runs the gRPC server on).
"""
