"""Expert parallelism as DeepEP does it, over ``shard_map`` collectives on the mesh's ``ep`` axis.

- ``layout``: ``get_dispatch_layout`` and the shared argument checks.
- ``normal``: ``dispatch`` / ``combine`` for training and prefill (bf16 or FP8 on the wire, expanded
  grouped-by-expert layout, fixed-capacity buffers with counted drops, custom VJPs).
"""

from sharding.ep.layout import DispatchLayout, get_dispatch_layout
from sharding.ep.normal import DispatchHandle, Dispatched, combine, dispatch

__all__ = ["DispatchLayout", "get_dispatch_layout", "DispatchHandle", "Dispatched", "dispatch", "combine"]
