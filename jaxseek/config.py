"""Frozen configuration dataclasses: one per concern, validated at construction.

Every invalid value raises a ``ValueError`` naming the field, so a typo in a preset or a CLI override
fails before any array is allocated. Presets live in ``jaxseek/presets.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

from jaxseek.model.experts import GROUPED_MATMULS, MOE_STRATEGIES
from pallas_kernels.fp8_gemm.vjp import FP8Recipe

ComputeDtype = Literal["float32", "bfloat16"]
Remat = Literal["none", "block", "attention"]


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{field}: {message}")


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3).

    Queries go through a low-rank bottleneck (``q_lora_rank``, 0 = a plain projection); keys and values
    are compressed jointly to ``kv_lora_rank`` latents plus one decoupled RoPE key of
    ``qk_rope_head_dim`` shared by all heads. Decoding kernels attend over the
    ``kv_lora_rank + qk_rope_head_dim`` (512 + 64 = 576) latent directly.

    RoPE rotates adjacent pairs of the RoPE dimensions (DeepSeek's convention). YaRN context extension
    (``rope_factor`` > 1) takes effect when the model's ``max_seq_len`` exceeds ``original_seq_len``, as in
    DeepSeek's reference: the frequencies between the ``beta_fast`` and ``beta_slow`` correction bounds are
    interpolated by ``rope_factor`` and the softmax scale is multiplied by ``(0.1 * mscale * ln(rope_factor) + 1)^2``.
    """

    num_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_theta: float = 10000.0
    rope_factor: float = 1.0  # YaRN scaling factor (1 = plain RoPE); DeepSeek-V3: 40
    original_seq_len: int = 4096  # the context the RoPE frequencies were trained for
    beta_fast: float = 32.0  # YaRN: rotations below which a frequency is fully interpolated...
    beta_slow: float = 1.0  # ...and above which it is kept (extrapolated)
    mscale: float = 1.0  # YaRN attention temperature coefficient

    def __post_init__(self):
        for name in ("num_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            _require(getattr(self, name) > 0, f"mla.{name}", f"must be positive, got {getattr(self, name)}")
        _require(self.q_lora_rank >= 0, "mla.q_lora_rank", f"must be >= 0 (0 = no q compression), got {self.q_lora_rank}")
        _require(self.qk_rope_head_dim % 2 == 0, "mla.qk_rope_head_dim",
                 f"RoPE rotates pairs of dimensions, so it must be even, got {self.qk_rope_head_dim}")
        _require(self.rope_theta > 0, "mla.rope_theta", f"must be positive, got {self.rope_theta}")
        _require(self.rope_factor >= 1, "mla.rope_factor", f"must be >= 1 (1 = no YaRN), got {self.rope_factor}")
        _require(self.original_seq_len > 0, "mla.original_seq_len", f"must be positive, got {self.original_seq_len}")
        _require(self.beta_fast > self.beta_slow > 0, "mla.beta_fast",
                 f"YaRN needs beta_fast > beta_slow > 0, got {self.beta_fast} and {self.beta_slow}")
        _require(self.mscale >= 0, "mla.mscale", f"must be >= 0, got {self.mscale}")

    def uses_yarn(self, max_seq_len: int) -> bool:
        """DeepSeek's rule: YaRN applies when the context is longer than the original one and factor > 1."""
        return self.rope_factor > 1 and max_seq_len > self.original_seq_len

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Width of one cached token in the absorbed form (576 for DeepSeek-V3)."""
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """DeepSeekMoE: shared experts plus routed SwiGLU experts, sigmoid gate, group-limited top-k.

    ``strategy`` names the MoE region (dispatch -> grouped expert matmuls on the local experts ->
    combine; "ep": DeepEP-style expert parallelism over the mesh's ``ep`` axis when it is > 1, else local;
    "local": every expert where the tokens are) and ``grouped_matmul`` the
    expert matmul inside it ("auto" picks per backend); ``jaxseek/model/experts.py`` is the one place
    that maps the names to code.
    """

    num_routed_experts: int
    num_shared_experts: int
    num_experts_per_token: int
    intermediate_size: int
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    bias_update_rate: float = 1e-3
    seq_aux_loss_weight: float = 0.0
    grouped_matmul: str = "auto"
    strategy: str = "ep"  # "ep": expert parallelism under a mesh with ep > 1, local elsewhere; "local": never
    capacity_factor: float = 0.0  # EP buffers as a multiple of the mean load; 0 = dropless (worst case)
    drop_policy: str = "raise"  # what training does when copies were dropped: "raise" or "drop" (count them)
    fp8_dispatch: bool = False  # EP: tokens travel as 1x128 FP8 (hidden a multiple of 128)
    num_physical_experts: int = 0  # EPLB: expert slots including redundant replicas (0 = no replicas)
    eplb_gpus: int = 1  # EPLB: expert-parallel ranks the slots are placed on

    def __post_init__(self):
        _require(self.num_routed_experts > 0, "moe.num_routed_experts", f"must be positive, got {self.num_routed_experts}")
        _require(self.num_shared_experts >= 0, "moe.num_shared_experts", f"must be >= 0, got {self.num_shared_experts}")
        _require(self.intermediate_size > 0, "moe.intermediate_size", f"must be positive, got {self.intermediate_size}")
        _require(0 < self.num_experts_per_token <= self.num_routed_experts, "moe.num_experts_per_token",
                 f"top-k must be in [1, num_routed_experts={self.num_routed_experts}], got {self.num_experts_per_token}")
        _require(self.n_group > 0 and self.num_routed_experts % self.n_group == 0, "moe.n_group",
                 f"must divide num_routed_experts={self.num_routed_experts}, got {self.n_group}")
        _require(0 < self.topk_group <= self.n_group, "moe.topk_group",
                 f"must be in [1, n_group={self.n_group}], got {self.topk_group}")
        experts_per_group = self.num_routed_experts // self.n_group
        _require(self.num_experts_per_token <= self.topk_group * experts_per_group, "moe.num_experts_per_token",
                 f"{self.num_experts_per_token} experts cannot be chosen from {self.topk_group} groups of "
                 f"{experts_per_group}")
        _require(experts_per_group >= 2 or self.n_group == 1, "moe.n_group",
                 "a group's score is the sum of its top-2 experts, so groups need at least 2 experts")
        _require(self.routed_scaling_factor > 0, "moe.routed_scaling_factor", f"must be positive, got {self.routed_scaling_factor}")
        _require(self.bias_update_rate >= 0, "moe.bias_update_rate", f"must be >= 0, got {self.bias_update_rate}")
        _require(self.seq_aux_loss_weight >= 0, "moe.seq_aux_loss_weight", f"must be >= 0, got {self.seq_aux_loss_weight}")
        _require(self.grouped_matmul in GROUPED_MATMULS, "moe.grouped_matmul",
                 f"expected one of {GROUPED_MATMULS}, got {self.grouped_matmul!r}")
        _require(self.strategy in MOE_STRATEGIES, "moe.strategy",
                 f"expected one of {MOE_STRATEGIES}, got {self.strategy!r}")
        _require(self.capacity_factor >= 0, "moe.capacity_factor", f"must be >= 0 (0 = dropless), got {self.capacity_factor}")
        _require(self.drop_policy in ("raise", "drop"), "moe.drop_policy",
                 f"expected 'raise' or 'drop', got {self.drop_policy!r}")
        if self.num_physical_experts:
            _require(self.num_physical_experts >= self.num_routed_experts, "moe.num_physical_experts",
                     f"must be 0 or >= num_routed_experts={self.num_routed_experts}, got {self.num_physical_experts}")
            _require(self.eplb_gpus > 0 and self.num_physical_experts % self.eplb_gpus == 0, "moe.eplb_gpus",
                     f"must divide num_physical_experts={self.num_physical_experts}, got {self.eplb_gpus}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A DeepSeek-V3-style decoder: embed -> blocks (first ``first_k_dense`` dense, then MoE) -> norm -> head,
    plus ``mtp_depth`` multi-token-prediction modules (0 disables).

    ``max_seq_len`` bounds the positions the model accepts and switches YaRN on when it exceeds
    ``mla.original_seq_len``. ``remat`` recomputes activations in the backward pass: "block" keeps only each
    block's input, "attention" recomputes the attention half of each block.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # the dense layers' SwiGLU width
    num_layers: int
    first_k_dense: int
    mla: MLAConfig
    moe: MoEConfig
    mtp_depth: int = 0
    mtp_loss_weight: float = 0.3
    rms_norm_eps: float = 1e-6
    max_seq_len: int = 4096
    compute_dtype: ComputeDtype = "float32"
    fp8: bool = False  # DeepSeek-V3's FP8 GEMMs in the dense projections (see also moe.grouped_matmul)
    fp8_gemms: str = "forward,dgrad,wgrad"  # which of a linear layer's GEMMs run in FP8 when ``fp8`` (ablations)
    init_std: float = 0.02
    remat: Remat = "none"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "max_seq_len"):
            _require(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        _require(0 <= self.first_k_dense <= self.num_layers, "first_k_dense",
                 f"must be in [0, num_layers={self.num_layers}], got {self.first_k_dense}")
        # Every DeepSeek release keeps hidden_size a multiple of the head count (7168 = 128 * 56); the
        # per-head shardings of the attention projections rely on it.
        _require(self.hidden_size % self.mla.num_heads == 0, "mla.num_heads",
                 f"must divide hidden_size={self.hidden_size}, got {self.mla.num_heads}")
        _require(not self.moe.fp8_dispatch or self.hidden_size % 128 == 0, "moe.fp8_dispatch",
                 f"FP8 dispatch casts 1x128 groups: hidden_size must be a multiple of 128, got {self.hidden_size}")
        _require(self.mtp_depth >= 0, "mtp_depth", f"must be >= 0 (0 disables MTP), got {self.mtp_depth}")
        _require(self.mtp_loss_weight >= 0, "mtp_loss_weight", f"must be >= 0, got {self.mtp_loss_weight}")
        _require(self.rms_norm_eps > 0, "rms_norm_eps", f"must be positive, got {self.rms_norm_eps}")
        _require(self.compute_dtype in ("float32", "bfloat16"), "compute_dtype",
                 f"expected 'float32' or 'bfloat16', got {self.compute_dtype!r}")
        _require(self.remat in get_args(Remat), "remat", f"expected one of {get_args(Remat)}, got {self.remat!r}")
        _require(self.init_std > 0, "init_std", f"must be positive, got {self.init_std}")
        FP8Recipe.parse(self.fp8_gemms)  # raises naming fp8_gemms

    @property
    def fp8_recipe(self) -> FP8Recipe | None:
        """The FP8 GEMMs of every linear layer, or None when the model trains without FP8."""
        return FP8Recipe.parse(self.fp8_gemms) if self.fp8 else None

    @property
    def yarn(self) -> bool:
        """Whether YaRN scaling is in effect (DeepSeek's rule: a context longer than the original one)."""
        return self.mla.uses_yarn(self.max_seq_len)

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def with_fp8(self, gemms: str = "forward,dgrad,wgrad") -> ModelConfig:
        """FP8 training as DeepSeek-V3: every linear GEMM except the embedding, output head and router; ``gemms``
        keeps the others (of forward, dgrad, wgrad) in the compute dtype."""
        return self.replace(fp8=True, fp8_gemms=gemms, moe=dataclasses.replace(self.moe, grouped_matmul="fp8"))


@dataclasses.dataclass(frozen=True)
class EPLBConfig:
    """Online expert placement during training (needs ``moe.num_physical_experts`` > 0 to act).

    every: rebalance every this many steps (0 = never); nodes: server nodes the EP ranks form;
    load_decay: the exponential average of per-expert token counts the placement is computed from;
    min_improvement: a layer keeps its placement unless balancedness improves by at least this much.
    """

    every: int = 0
    nodes: int = 1
    load_decay: float = 0.9
    min_improvement: float = 0.02

    def __post_init__(self):
        _require(self.every >= 0, "eplb.every", f"must be >= 0 (0 = off), got {self.every}")
        _require(self.nodes > 0, "eplb.nodes", f"must be positive, got {self.nodes}")
        _require(0 <= self.load_decay < 1, "eplb.load_decay", f"must be in [0, 1), got {self.load_decay}")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Pipeline parallelism, used when the mesh's ``pp`` axis is > 1 (``sharding.dualpipe``).

    schedule: "1f1b" | "zb1p" | "dualpipe" | "dualpipev"; micro_batches: how many micro-batches a step's batch
    is cut into (0 = 2 x the pp ranks, the fewest DualPipe accepts).
    """

    schedule: str = "1f1b"
    micro_batches: int = 0

    def __post_init__(self):
        kinds = ("1f1b", "zb1p", "dualpipe", "dualpipev")
        _require(self.schedule in kinds, "pipeline.schedule", f"must be one of {kinds}, got {self.schedule!r}")
        _require(self.micro_batches >= 0, "pipeline.micro_batches",
                 f"must be >= 0 (0 = 2 x pp), got {self.micro_batches}")

    def chunks(self, pp: int) -> int:
        return self.micro_batches or 2 * pp


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training loop: batch, optimiser (AdamW, warmup + cosine), clipping, checkpoints, evaluation."""

    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    clip_norm: float = 1.0
    checkpoint_every: int = 100
    eval_every: int = 100
    eval_batches: int = 4
    seed: int = 0
    eplb: EPLBConfig = EPLBConfig()
    pipeline: PipelineConfig = PipelineConfig()

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "checkpoint_every", "eval_every", "eval_batches"):
            _require(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        _require(self.learning_rate > 0, "learning_rate", f"must be positive, got {self.learning_rate}")
        _require(0 <= self.warmup_steps < self.steps, "warmup_steps", f"must be in [0, steps={self.steps}), got {self.warmup_steps}")
        _require(0 <= self.final_lr_fraction <= 1, "final_lr_fraction", f"must be in [0, 1], got {self.final_lr_fraction}")
        _require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(self.clip_norm > 0, "clip_norm", f"must be positive, got {self.clip_norm}")

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)
