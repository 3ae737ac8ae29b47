"""Expert parallelism as DeepEP does it, over ``shard_map`` collectives on the mesh's ``ep`` axis.

- ``layout``: ``get_dispatch_layout`` and the shared argument checks.
- ``normal``: ``dispatch`` / ``combine`` for training and prefill (bf16 or FP8 on the wire, expanded
  grouped-by-expert layout, fixed-capacity buffers with counted drops, custom VJPs).
- ``hierarchical``: ``hierarchical_dispatch`` / ``hierarchical_combine`` over two axes (node x local): node-limited
  routing, across nodes once per node then inside the node, inter-node bytes counted (``inter_node_bytes``).
"""

from sharding.ep.layout import DispatchLayout, get_dispatch_layout
from sharding.ep.normal import DispatchHandle, Dispatched, combine, dispatch
from sharding.ep.hierarchical import (HierarchicalDispatched, HierarchicalHandle, hierarchical_combine,
                                      hierarchical_dispatch, inter_node_bytes, row_bytes)

__all__ = ["DispatchLayout", "get_dispatch_layout", "DispatchHandle", "Dispatched", "dispatch", "combine"]
__all__ += ["HierarchicalDispatched", "HierarchicalHandle", "hierarchical_combine", "hierarchical_dispatch",
            "inter_node_bytes", "row_bytes"]
