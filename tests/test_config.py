import dataclasses

import pytest

from jaxseek.config import MLAConfig, ModelConfig, MoEConfig, TrainConfig
from jaxseek.presets import PRESET_BUILDERS, get_preset


@pytest.mark.parametrize("name", sorted(PRESET_BUILDERS))
def test_presets_are_valid(name):
    model, train = get_preset(name)
    assert isinstance(model, ModelConfig) and isinstance(train, TrainConfig)


def test_unknown_preset_names_the_argument():
    with pytest.raises(ValueError, match="preset"):
        get_preset("huge")


@pytest.mark.parametrize("changes, field", [
    (dict(num_experts_per_token=9), "moe.num_experts_per_token"),  # top-k > experts
    (dict(n_group=3), "moe.n_group"),  # groups not dividing experts
    (dict(topk_group=5), "moe.topk_group"),
    (dict(num_experts_per_token=5, n_group=4, topk_group=2), "moe.num_experts_per_token"),  # 5 > 2 groups x 2
    (dict(strategy="nccl"), "moe.strategy"),
    (dict(grouped_matmul="cublas"), "moe.grouped_matmul"),
    (dict(bias_update_rate=-1.0), "moe.bias_update_rate"),
])
def test_bad_moe_values_name_the_field(micro_config, changes, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        dataclasses.replace(micro_config.moe, **changes)


@pytest.mark.parametrize("changes, field", [
    (dict(qk_rope_head_dim=5), "mla.qk_rope_head_dim"),
    (dict(kv_lora_rank=0), "mla.kv_lora_rank"),
    (dict(q_lora_rank=-1), "mla.q_lora_rank"),
])
def test_bad_mla_values_name_the_field(micro_config, changes, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        dataclasses.replace(micro_config.mla, **changes)


@pytest.mark.parametrize("changes, field", [
    (dict(mla=MLAConfig(num_heads=3, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                        v_head_dim=8)), "mla.num_heads"),  # heads not dividing hidden_size=32
    (dict(first_k_dense=3), "first_k_dense"),
    (dict(mtp_depth=-1), "mtp_depth"),
    (dict(compute_dtype="float16"), "compute_dtype"),
    (dict(vocab_size=0), "vocab_size"),
])
def test_bad_model_values_name_the_field(micro_config, changes, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        micro_config.replace(**changes)


@pytest.mark.parametrize("changes, field", [
    (dict(warmup_steps=300), "warmup_steps"),
    (dict(batch_size=0), "batch_size"),
    (dict(clip_norm=0.0), "clip_norm"),
])
def test_bad_train_values_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig().replace(**changes)
