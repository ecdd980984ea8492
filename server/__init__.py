"""loramux server: model, engine, gRPC service and CLI."""
