"""FlashMLA's paged MLA decoding (``api.py`` for the op, ``metadata.py`` for the split-KV schedule,
``fp8_cache.py`` for the FP8 KV cache)."""

from pallas_kernels.mla_decode.api import flash_mla_with_kvcache
from pallas_kernels.mla_decode.fp8_cache import (FP8KVCache, dequantize_kv_cache, pack_flashmla, quantize_kv_cache,
                                                 unpack_flashmla)
from pallas_kernels.mla_decode.metadata import BLOCK_SIZE, MLAMetadata, get_mla_metadata

__all__ = ["flash_mla_with_kvcache", "get_mla_metadata", "MLAMetadata", "BLOCK_SIZE", "FP8KVCache",
           "quantize_kv_cache", "dequantize_kv_cache", "pack_flashmla", "unpack_flashmla"]
