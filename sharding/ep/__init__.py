"""Expert parallelism as DeepEP does it, over ``shard_map`` collectives on the mesh's ``ep`` axis.

- ``layout``: ``get_dispatch_layout`` and the shared argument checks.
- ``normal``: ``dispatch`` / ``combine`` for training and prefill (bf16 or FP8 on the wire, expanded
  grouped-by-expert layout, fixed-capacity buffers with counted drops, custom VJPs).
- ``hierarchical``: ``hierarchical_dispatch`` / ``hierarchical_combine`` over two axes (node x local): node-limited
  routing, across nodes once per node then inside the node, inter-node bytes counted (``inter_node_bytes``).
- ``low_latency``: ``low_latency_dispatch`` / ``low_latency_combine`` for decoding (one row per (token,
  expert) pair into DeepGEMM's masked layout, FP8 messages in DeepEP's format, weighted combine).
"""

from sharding.ep.layout import DispatchLayout, get_dispatch_layout
from sharding.ep.normal import DispatchHandle, Dispatched, combine, dispatch
from sharding.ep.hierarchical import (HierarchicalDispatched, HierarchicalHandle, hierarchical_combine,
                                      hierarchical_dispatch, inter_node_bytes, row_bytes)
from sharding.ep.low_latency import (LowLatencyBytes, LowLatencyDispatched, LowLatencyHandle, low_latency_bytes,
                                     low_latency_combine, low_latency_dispatch)

__all__ = ["DispatchLayout", "get_dispatch_layout", "DispatchHandle", "Dispatched", "dispatch", "combine",
           "LowLatencyBytes", "LowLatencyDispatched", "LowLatencyHandle", "low_latency_bytes", "low_latency_combine",
           "low_latency_dispatch"]
__all__ += ["HierarchicalDispatched", "HierarchicalHandle", "hierarchical_combine", "hierarchical_dispatch",
            "inter_node_bytes", "row_bytes"]
