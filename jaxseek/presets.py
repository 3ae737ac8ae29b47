"""Named model and training presets.

``deepseek-v3`` carries the published DeepSeek-V3 shapes (HF ``config.json`` of deepseek-ai/DeepSeek-V3);
it is only ever built abstractly (``nnx.eval_shape``) on a CPU. ``tiny`` is sized so a training step takes
well under a second on a 2-core CPU; ``small`` is a step up for a single GPU.
"""

from __future__ import annotations

from jaxseek.config import MLAConfig, ModelConfig, MoEConfig, TrainConfig

BYTE_VOCAB = 256  # byte-level tokens: the default data is raw UTF-8 bytes


def _tiny() -> tuple[ModelConfig, TrainConfig]:
    model = ModelConfig(
        vocab_size=BYTE_VOCAB,
        hidden_size=64,
        intermediate_size=192,
        num_layers=3,
        first_k_dense=1,
        mla=MLAConfig(num_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                      qk_rope_head_dim=8, v_head_dim=16),
        moe=MoEConfig(num_routed_experts=8, num_shared_experts=1, num_experts_per_token=2,
                      intermediate_size=64, n_group=4, topk_group=2, routed_scaling_factor=1.0,
                      # 10x DeepSeek-V3's rate: a 500-step run must balance within tens of steps.
                      bias_update_rate=1e-2, seq_aux_loss_weight=1e-4),
        mtp_depth=1,
        max_seq_len=1024,
    )
    return model, TrainConfig(steps=500, batch_size=16, seq_len=128, learning_rate=6e-3, warmup_steps=25,
                              checkpoint_every=250, eval_every=100)


def _small() -> tuple[ModelConfig, TrainConfig]:
    model = ModelConfig(
        vocab_size=BYTE_VOCAB,
        hidden_size=256,
        intermediate_size=768,
        num_layers=6,
        first_k_dense=1,
        mla=MLAConfig(num_heads=8, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
                      qk_rope_head_dim=16, v_head_dim=32),
        moe=MoEConfig(num_routed_experts=16, num_shared_experts=1, num_experts_per_token=4,
                      intermediate_size=128, n_group=4, topk_group=2, routed_scaling_factor=1.5,
                      bias_update_rate=1e-3, seq_aux_loss_weight=1e-4),
        mtp_depth=1,
        max_seq_len=2048,
    )
    return model, TrainConfig(steps=2000, batch_size=32, seq_len=256, learning_rate=2e-3, warmup_steps=100,
                              checkpoint_every=500, eval_every=250)


def _deepseek_v3() -> tuple[ModelConfig, TrainConfig]:
    model = ModelConfig(
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,
        num_layers=61,
        first_k_dense=3,
        # YaRN as released: factor 40 over the 4K pre-training context, on since max_seq_len > 4096.
        mla=MLAConfig(num_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                      qk_rope_head_dim=64, v_head_dim=128, rope_factor=40.0, original_seq_len=4096,
                      beta_fast=32.0, beta_slow=1.0, mscale=1.0),
        moe=MoEConfig(num_routed_experts=256, num_shared_experts=1, num_experts_per_token=8,
                      intermediate_size=2048, n_group=8, topk_group=4, routed_scaling_factor=2.5,
                      bias_update_rate=1e-3, seq_aux_loss_weight=1e-4),
        mtp_depth=1,
        mtp_loss_weight=0.3,
        max_seq_len=163840,  # the released config's max_position_embeddings
        compute_dtype="bfloat16",
        init_std=0.006,
    )
    # The paper's pre-training: 4K context, 15360 sequences per batch at the end of the ramp.
    return model, TrainConfig(steps=10000, batch_size=15360, seq_len=4096, learning_rate=2.2e-4,
                              warmup_steps=2000, checkpoint_every=1000, eval_every=1000)


PRESET_BUILDERS = {"tiny": _tiny, "small": _small, "deepseek-v3": _deepseek_v3}


def get_preset(name: str) -> tuple[ModelConfig, TrainConfig]:
    """Returns (model config, training config) for a preset name: 'tiny', 'small' or 'deepseek-v3'."""
    if name not in PRESET_BUILDERS:
        raise ValueError(f"preset: expected one of {sorted(PRESET_BUILDERS)}, got {name!r}")
    return PRESET_BUILDERS[name]()
