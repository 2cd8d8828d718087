"""Inference: one engine for the CLI, the server, evaluation and RL rollouts.

`Engine` (engine.py) generates from token ids over a latent-only paged KV cache (kv_cache.py,
attention.py) with continuous batching and chunked prefill (scheduler.py), per-request sampling
(sampling.py) and optional MTP self-speculative decoding (speculative.py), on the model's device
(host.py moves the host's lists there and the step's results back). `route_table` and
`write_heatmap` (inspect.py) show which experts each token visits.
"""

from seekling.inference.engine import Engine, EngineConfig, RequestOutput, TokenEvent
from seekling.inference.inspect import RouteTable, route_table, write_heatmap
from seekling.inference.sampling import SamplingParams

__all__ = ["Engine", "EngineConfig", "RequestOutput", "RouteTable", "SamplingParams", "TokenEvent",
           "route_table", "write_heatmap"]
