"""A Llama-style megatron GPTModel (RMSNorm, SwiGLU, GQA, RoPE, no bias, optionally MoE) with
TP/PP/EP-invariant init.

Weights are a function of (settings.seed, global parameter name) only: every parameter's FULL
tensor is drawn from its own generator and each rank keeps its slice, following megatron's
`partition_dim` / `partition_stride` (fc1 holds [gate_i; up_i]; qkv splits by query groups).
So the model built at TP=1, PP=1 and at any TP x PP from the same settings holds the same full
weights, which makes "same logits as TP=1" a test of the parallel code and nothing else.
(megatron's own CPU init draws from one shared stream, so a pipeline stage that skips the
embedding, or a different vocab padding, shifts every later weight.)

With `num_moe_experts` set, every MLP is megatron's MoE layer (mcore/moe.py): each expert's full
tensors are drawn under its global name, so an expert is the same whichever EP rank holds it
and however ETP splits it.

Layout: the vocabulary is padded with zero rows to a multiple of `vocab_pad_multiple`
(GPTModel does not pad; the vocab must split over TP); `gpt_logits` slices the padding off.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from parallel_adapters.distributed.sharding import REPLICATED, ShardSpec
from parallel_adapters.mcore import compat, cpu, moe
from parallel_adapters.mcore.norms import SequenceParallelNorm
from parallel_adapters.mcore.schedule import forward_only, prepended_tokens


@dataclass(frozen=True)
class GPTSettings:
    """Shape and init of a Llama-family GPT; everything else (parallel sizes) comes from Megatron's
    initialised parallel state."""

    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int = 2
    """Key/value heads (GQA); must divide num_attention_heads."""
    kv_channels: int | None = None
    """Head dim; None means hidden_size // num_attention_heads.  Attention scale is 1/sqrt(this)."""
    vocab_size: int = 256
    """The real vocabulary; the model holds it padded (see vocab_pad_multiple)."""
    max_position_embeddings: int = 128
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    tie_embeddings: bool = False
    sequence_parallel: bool = False
    """Split activations along the sequence between TP ranks; ignored at TP=1 (same math)."""
    params_dtype: torch.dtype = torch.float32
    init_method_std: float = 0.02
    seed: int = 1234
    """Seeds the weights (with each parameter's global name); not the dropout RNG."""
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    """A bias on linear_qkv only (Qwen2), whatever add_bias_linear says."""
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    vocab_pad_multiple: int = 8
    """The padded vocab is vocab_size rounded up to this; it must divide by every TP size used,
    so that models at different TP sizes have the same shapes."""
    recompute: str | None = None
    """Activation recompute: None, "full" (every layer's activations recomputed in backward) or
    "selective" (the attention scores only)."""
    num_moe_experts: int | None = None
    """Routed experts per layer; None builds dense MLPs.  Otherwise every MLP is megatron's MoE
    layer, its experts split over the expert-parallel sizes of the parallel state (mcore/moe.py)."""
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None
    """One expert's intermediate size; None means ffn_hidden_size."""
    moe_shared_expert_intermediate_size: int | None = None
    """Intermediate size of a shared expert that sees every token; None: no shared expert."""
    moe_token_dispatcher_type: str = "allgather"
    """Megatron's token dispatcher; only "allgather" runs on the CPU."""
    moe_router_dtype: str | None = None
    """Router logits/probabilities in "fp32", "fp64", or None: the activation dtype."""
    moe_aux_loss_coeff: float = 0.0
    """Load-balancing loss coefficient; 0 switches the auxiliary loss off."""
    moe_expert_capacity_factor: float | None = None
    """Megatron's moe_expert_capacity_factor: each expert takes at most factor x tokens x topk /
    experts of the tokens its router sees, the rest are dropped; None drops nothing."""
    moe_token_drop_policy: str = "probs"
    """Which tokens over capacity are dropped: "probs" (the lowest routing probabilities) or
    "position" (the latest in the sequence); megatron's moe_token_drop_policy."""
    moe_router_pre_softmax: bool = False
    """Softmax over all experts, then top-k (the top-k probabilities do not sum to 1: Qwen3-MoE with
    norm_topk_prob=false); False: top-k logits, then softmax over those k (= renormalised)."""
    moe_grouped_gemm: bool = False
    """Experts as megatron's `GroupedMLP` (fused weight1/weight2, grouped_gemm's `gmm`; needs the
    grouped_gemm package, adapters via adapters/hosts/grouped.py) instead of `SequentialMLP`."""
    qk_layernorm: bool = False
    """RMSNorm (weight over head_dim) on every query and key head before RoPE (Qwen3)."""

    def __post_init__(self) -> None:
        if self.recompute not in (None, "full", "selective"):
            raise ValueError(f"GPTSettings.recompute must be None, 'full' or 'selective', got {self.recompute!r}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"GPTSettings.num_query_groups={self.num_query_groups} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError("GPTSettings.hidden_size must divide by num_attention_heads when kv_channels is None")
        if self.vocab_pad_multiple < 1:
            raise ValueError(f"GPTSettings.vocab_pad_multiple must be >= 1, got {self.vocab_pad_multiple}")
        moe.check_moe_settings(self)

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads


def padded_vocab_size(settings: GPTSettings, tp_size: int = 1) -> int:
    """vocab_size rounded up to vocab_pad_multiple; ValueError if that does not split over TP."""
    multiple = settings.vocab_pad_multiple
    padded = -(-settings.vocab_size // multiple) * multiple
    if padded % tp_size:
        raise ValueError(
            f"GPTSettings.vocab_pad_multiple={multiple} pads vocab_size={settings.vocab_size} to "
            f"{padded}, which does not split over tensor_parallel={tp_size}; use a multiple of "
            f"every TP size you run (e.g. 8 or 128)"
        )
    return padded


def gpt_transformer_config(settings: GPTSettings) -> TransformerConfig:
    """The TransformerConfig for `settings` at the current TP/PP sizes (fusions off: on the CPU
    they cost a 16-25 s torch.compile)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    return TransformerConfig(
        num_layers=settings.num_layers,
        hidden_size=settings.hidden_size,
        ffn_hidden_size=settings.ffn_hidden_size,
        num_attention_heads=settings.num_attention_heads,
        num_query_groups=settings.num_query_groups,
        kv_channels=settings.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=settings.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=settings.add_bias_linear,
        add_qkv_bias=settings.add_qkv_bias,
        qk_layernorm=settings.qk_layernorm,
        attention_dropout=settings.attention_dropout,
        hidden_dropout=settings.hidden_dropout,
        init_method_std=settings.init_method_std,
        params_dtype=settings.params_dtype,
        pipeline_dtype=settings.params_dtype,
        # These tell megatron the activations are half precision, so attention's softmax runs in fp32.
        fp16=settings.params_dtype == torch.float16,
        bf16=settings.params_dtype == torch.bfloat16,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=settings.sequence_parallel and tp > 1,
        use_cpu_initialization=not torch.cuda.is_available(),
        recompute_granularity=settings.recompute,
        recompute_method="uniform" if settings.recompute == "full" else None,
        recompute_num_layers=1 if settings.recompute == "full" else None,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        **moe.moe_config_fields(settings),
    )


def _layer_spec(config: TransformerConfig) -> TransformerBlockSubmodules:
    """Megatron's local (no-TE) spec with our SP-capable norm in every norm slot (and MoE MLPs
    with SequentialMLP, or GroupedMLP, experts when config.num_moe_experts is set)."""
    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=config.moe_grouped_gemm,
                                    normalization="RMSNorm", qk_layernorm=config.qk_layernorm)
    if config.qk_layernorm:
        attention = spec.submodules.self_attention.submodules
        attention.q_layernorm = attention.k_layernorm = SequenceParallelNorm
    spec.submodules.input_layernorm = SequenceParallelNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelNorm
    num_layers = get_num_layers_to_build(config)  # this pipeline stage's share
    return TransformerBlockSubmodules(layer_specs=[spec] * num_layers, layer_norm=SequenceParallelNorm)


def build_gpt(
    settings: GPTSettings, *, pre_process: bool | None = None, post_process: bool | None = None,
    init_weights: bool = True,
) -> GPTModel:
    """This rank's GPTModel stage (pre/post_process default to the pipeline stage), with weights
    from `init_gpt_weights`.  Needs Megatron's parallel state (and, without CUDA, CPU mode).

    `init_weights=False` skips our init, for a caller that loads every weight next, as
    `import_hf_checkpoint` does: it draws each full tensor on every rank (what makes any TP/PP
    start identical), which for an 8B-70B base is minutes of wasted work.  Megatron's own init
    still runs: it is what marks the TP-split parameters (perform_initialization=False would not)."""
    if not compat.is_parallel_state_initialized():
        raise ValueError(
            "build_gpt: Megatron parallel state is not initialised; call "
            "parallel_adapters.mcore.compat.initialize_model_parallel(tp, pp) first"
        )
    if not torch.cuda.is_available() and not cpu.cpu_mode_enabled():
        raise RuntimeError("build_gpt without CUDA: call parallel_adapters.mcore.cpu.enable_cpu_mode() first")
    moe.check_moe_layout(settings)
    if settings.num_moe_experts is not None:
        moe.bind_router_gemm()  # megatron's MoE router without Transformer Engine, on any device
    config = gpt_transformer_config(settings)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    model = GPTModel(
        config=config,
        transformer_layer_spec=_layer_spec(config),
        vocab_size=padded_vocab_size(settings, tp),
        max_sequence_length=settings.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage() if pre_process is None else pre_process,
        post_process=parallel_state.is_pipeline_last_stage() if post_process is None else post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=settings.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=settings.rotary_base,
    )
    model.unpadded_vocab_size = settings.vocab_size  # read by gpt_logits
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())  # torch norms are built on the CPU, as megatron's get_model does
    if init_weights:
        init_gpt_weights(model, settings)
    return model


# ----------------------------------------------------------------------------------------------
# Deterministic, parallelism-invariant init
# ----------------------------------------------------------------------------------------------

def param_shard_spec(param: torch.Tensor) -> ShardSpec:
    """How megatron split this parameter (from its tensor_model_parallel attributes): over TP, or
    for a routed expert's weight over ETP (`moe.split_group` says which group)."""
    if not getattr(param, "tensor_model_parallel", False):
        return REPLICATED
    return ShardSpec(dim=int(param.partition_dim), chunks=int(getattr(param, "partition_stride", 1)))


def global_parameter_names(model: GPTModel) -> dict[str, str]:
    """Local name -> name in the PP=1, EP=1 model (pipeline stages number their layers from 0;
    expert-parallel ranks their experts: local expert i becomes its global index)."""
    layers = {}
    decoder = getattr(model, "decoder", None)
    if decoder is not None:
        for i, layer in enumerate(decoder.layers):
            layers[f"decoder.layers.{i}."] = (f"decoder.layers.{layer.layer_number - 1}.", layer)
    names = {}
    for name, _ in model.named_parameters():
        out = name
        if name.startswith("decoder.layers."):
            local = ".".join(name.split(".")[:3]) + "."
            prefix, layer = layers[local]
            out = prefix + moe.global_expert_suffix(layer, name[len(local):])
        names[name] = out
    return names


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def full_parameter_init(settings: GPTSettings, name: str, full_shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 full (unsharded) tensor of parameter `name` (global name) of shape full_shape.

    Norm weights are 1 + N(0, std) rather than ones, so that a parity test notices a misplaced
    norm; biases are zero; linear_proj / linear_fc2 use megatron's scaled std/sqrt(2 L)."""
    std = settings.init_method_std
    gen = _generator(settings.seed, name)
    if name.endswith(".bias"):
        return torch.zeros(full_shape)
    if "layernorm" in name:
        return 1.0 + std * torch.randn(full_shape, generator=gen)
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        std = std / math.sqrt(2.0 * settings.num_layers)
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        rows = settings.vocab_size  # the padding rows stay zero, whatever the padded size
        real = std * torch.randn((rows, *full_shape[1:]), generator=gen)
        return torch.cat([real, real.new_zeros((full_shape[0] - rows, *full_shape[1:]))])
    return std * torch.randn(full_shape, generator=gen)


@torch.no_grad()
def init_gpt_weights(model: GPTModel, settings: GPTSettings) -> None:
    """Overwrite every parameter with this rank's slice of `full_parameter_init` (experts: of
    the expert's full tensor, split over ETP; GroupedMLP: the same per-expert tensors, fused)."""
    groups = compat.megatron_parallel_groups()
    names = global_parameter_names(model)
    for local_name, param in model.named_parameters():
        name = names[local_name]
        if settings.tie_embeddings and name == "output_layer.weight":
            name = "embedding.word_embeddings.weight"  # the last stage's copy of the shared table
        spec = param_shard_spec(param)
        _, size, rank = moe.split_group(name, groups)
        if moe.is_grouped_weight(name):  # GroupedMLP: the SequentialMLP experts' weights, fused
            moe_layer = model.get_submodule(local_name.rsplit(".", 2)[0])
            param.copy_(moe.grouped_expert_weight(
                lambda n, shape: full_parameter_init(settings, n, shape), name, param.shape,
                moe_layer.local_expert_indices, settings.moe_ffn_hidden_size or settings.ffn_hidden_size,
                settings.hidden_size, rank, size).to(param.dtype))
            continue
        full = full_parameter_init(settings, name, spec.global_shape(param.shape, size))
        param.copy_(spec.shard(full, rank, size).to(param.dtype))


# ----------------------------------------------------------------------------------------------
# Logits
# ----------------------------------------------------------------------------------------------

def sequence_multiple(model: torch.nn.Module) -> int:
    """What a sequence length must divide by in this model's forward: the TP size under sequence
    parallelism (the activations are split along the sequence between the TP ranks), else 1."""
    inner = model
    while hasattr(inner, "module"):  # megatron DDP / Float16Module wrappers
        inner = inner.module
    config = getattr(inner, "config", None)
    if config is None or not getattr(config, "sequence_parallel", False):
        return 1
    return parallel_state.get_tensor_model_parallel_world_size()


def pad_right(input_ids: torch.Tensor, multiple: int, pad_id: int = 0, extra: int = 0) -> torch.Tensor:
    """input_ids [batch, seq] with `pad_id` appended until `extra` + seq (the model prepends
    `extra` positions) is a multiple of `multiple` (unchanged when it already is).  Under the
    causal mask a position attends only to earlier ones, so the padding changes no real position's
    logits."""
    extra = -(extra + input_ids.shape[1]) % multiple
    if not extra:
        return input_ids
    return torch.cat([input_ids, input_ids.new_full((input_ids.shape[0], extra), pad_id)], dim=1)


def gpt_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor | None:
    """Full-vocabulary logits [batch, seq, vocab] (causal mask, RoPE positions), gathered over TP
    and with the vocab padding sliced off.  Any sequence length: under sequence parallelism the
    input is right-padded to a multiple of TP and the padded positions are dropped from the
    logits.  With PP > 1 it runs megatron's forward-only schedule (one microbatch) and returns the
    logits on the last stage, None on the others."""
    inner = model
    while hasattr(inner, "module"):  # megatron DDP / Float16Module wrappers
        inner = inner.module
    vocab = getattr(inner, "unpadded_vocab_size", inner.vocab_size)
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    extra = prepended_tokens(model)  # prompt tuning's virtual tokens: their logits come first, as PEFT's
    length = extra + input_ids.shape[1]
    multiple = sequence_multiple(model)
    padded = pad_right(input_ids, multiple, extra=extra)
    logits = forward_only(model, padded, pp_size, runtime_gather_output=True)
    return None if logits is None else logits[:, :length, :vocab]
