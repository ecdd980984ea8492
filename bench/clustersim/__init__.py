"""The fleet simulation behind `loramux bench cluster-sim` (bench/cluster_sim.py).

- `costs`: what a step and a cold load cost (bench/cluster_costs.json; `measure` re-times them);
- `state`: what routers can see of the fleet;
- `replica`: one replica's loader, host tier, device slots and continuous batching;
- `routing`: random, least-loaded, Ray Serve multiplexing, llm-d's LoRA-affinity scoring;
- `sim`: the event loop and its summary; `report`: table, sizing lines, plot.
Standard library and numpy only (matplotlib for the plot, the engine for `measure`).
"""
