"""The DeepSeek-V3-style model in Flax NNX: MLA, DeepSeekMoE, multi-token prediction."""
