"""loramux on Ray Serve: replicas of one loramux server each, with adapter affinity.

    HTTP client -> Ray's proxy -> LoramuxIngress --(handle, multiplexed_model_id = the adapter)-->
        LoramuxReplica: @serve.multiplexed warms the adapter, then the request runs through the
        replica's own OpenAI shim -> its in-process gRPC server -> its engine

Each replica is `loramux serve` in one Ray actor (`local_server.LocalServer`: the same engine,
router, gRPC service and HTTP app), so validation, limits and error messages are the shim's.
The ingress reads only the OpenAI body's `model`: an adapter name becomes the call's multiplexed
model id, so Ray's router prefers a replica that holds that adapter and spills over to another
when that one is full. The base model, "auto" (routed inside the replica) and mixtures carry
none. Answers carry `x-loramux-replica`, the replica that served them.

    settings.py      RayConfig and the `serve run key=value` arguments as flags (no ray import)
    wire.py          what the ingress and a replica pass each other (no ray import)
    local_server.py  one loramux server in this process, called in-process (no ray import)
    app.py           the two deployments and `build_app` (`serve run server.ray_serve.app:build_app`)
    launch.py        `loramux ray`: start or join a Ray cluster, deploy, serve until a signal

Only app.py and launch.py import ray, the optional extra (`pip install loramux[ray]`).
"""
