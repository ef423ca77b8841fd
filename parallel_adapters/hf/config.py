"""Llama-family Hugging Face config.json: read, validate, and reduce to the numbers the layout needs.

Pure (no megatron, no transformers).  Llama, Mistral, Qwen2 (the same layers plus biases on
q/k/v), Qwen3 (RMSNorm on each query/key head: q_norm / k_norm, head_dim free of hidden/heads),
and the mixture-of-experts families Qwen3-MoE (Qwen3 attention, every MLP a routed MoE) and
Mixtral (Mistral attention, every MLP a routed MoE).  Whatever GPTSettings cannot express (other biases, scaled or
partial RoPE, sliding-window attention, other activations, quantization) is refused with a
ValueError naming the config.json field, rather than silently approximated.  transformers 5
keeps the RoPE theta under `rope_parameters.rope_theta`; older files under `rope_theta`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral")
QK_NORM_TYPES = ("qwen3", "qwen3_moe")
MOE_TYPES = ("qwen3_moe", "mixtral")
UNCOVERED_MOE_TYPES = {  # model_type -> what the Qwen3-MoE / Mixtral code path lacks for it
    "olmoe": "its q_norm / k_norm are RMSNorms over the whole query and key projections (hidden_size and "
             "num_key_value_heads x head_dim wide), where Megatron's qk_layernorm normalises each head; and "
             "clip_qkv clamps q/k/v, which has no Megatron counterpart",
    "gpt_oss": "attention sinks (a learned logit per head), alternating sliding-window layers, biases on "
               "q/k/v/o, the router and the experts, the clamped SwiGLU ((up + 1) * gate * sigmoid(alpha gate), "
               "swiglu_limit) on interleaved gate/up columns, and YaRN RoPE have no counterpart in the Megatron "
               "GPT built here (and the published weights are MXFP4-quantised)",
}



@dataclass(frozen=True)
class LlamaShape:
    """The architecture numbers of a Llama-family config.json that the mapping depends on."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    attention_dropout: float = 0.0
    qkv_bias: bool = False
    """Biases on q_proj / k_proj / v_proj only (Qwen2)."""
    model_type: str = "llama"
    qk_norm: bool = False
    """RMSNorm over head_dim on every query and key head before RoPE (Qwen3: q_norm / k_norm)."""
    num_experts: int = 0
    """Routed experts per layer (every layer); 0: dense MLPs."""
    moe_topk: int = 0
    moe_intermediate_size: int = 0
    """One expert's intermediate size (Mixtral: its intermediate_size)."""
    norm_topk_prob: bool = False
    """The top-k routing probabilities are renormalised to sum to 1 (Mixtral always does)."""

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def qkv_rows(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], where: str = "config.json") -> "LlamaShape":
        """Validate a config.json dict; ValueError naming the field for anything unsupported."""
        _check_supported(cfg, where)
        heads = _int_field(cfg, "num_attention_heads", where)
        kv = cfg.get("num_key_value_heads") or heads
        hidden = _int_field(cfg, "hidden_size", where)
        head_dim = cfg.get("head_dim") or hidden // heads
        if not isinstance(kv, int) or heads % kv:
            raise ValueError(f"{where}: num_key_value_heads={kv!r} must divide num_attention_heads={heads}")
        if not cfg.get("head_dim") and hidden % heads:
            raise ValueError(f"{where}: hidden_size={hidden} does not divide by num_attention_heads={heads} "
                             "and no head_dim is given")
        return cls(
            num_layers=_int_field(cfg, "num_hidden_layers", where), hidden_size=hidden,
            intermediate_size=_int_field(cfg, "intermediate_size", where), num_heads=heads,
            num_kv_heads=kv, head_dim=int(head_dim), vocab_size=_int_field(cfg, "vocab_size", where),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=_int_field(cfg, "max_position_embeddings", where),
            rope_theta=_rope_theta(cfg, where), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            attention_dropout=float(cfg.get("attention_dropout", 0.0) or 0.0),
            qkv_bias=cfg.get("model_type") == "qwen2", model_type=cfg["model_type"],
            qk_norm=cfg["model_type"] in QK_NORM_TYPES, **_moe_fields(cfg, where),
        )


def _moe_fields(cfg: Mapping[str, Any], where: str) -> dict:
    """num_experts .. norm_topk_prob of a MoE family ({} for a dense one); what Megatron's
    MoE layer cannot reproduce is refused by name."""
    model_type = cfg["model_type"]
    if model_type not in MOE_TYPES:
        return {}
    experts_field = "num_experts" if "num_experts" in cfg else "num_local_experts"  # both spellings occur
    experts = _int_field(cfg, experts_field, where)
    topk = _int_field(cfg, "num_experts_per_tok", where)
    if topk > experts:
        raise ValueError(f"{where}: num_experts_per_tok={topk} exceeds {experts_field}={experts}")
    if model_type == "mixtral":
        if cfg.get("router_jitter_noise"):
            raise ValueError(f"{where}: field 'router_jitter_noise'={cfg['router_jitter_noise']!r} is not "
                             "supported (it scales the experts' input too; Megatron's jitter does not)")
        return dict(num_experts=experts, moe_topk=topk, norm_topk_prob=True,
                    moe_intermediate_size=_int_field(cfg, "intermediate_size", where))
    if cfg.get("decoder_sparse_step", 1) != 1:
        raise ValueError(f"{where}: field 'decoder_sparse_step'={cfg['decoder_sparse_step']!r} is not supported "
                         "(every layer must be MoE: 1)")
    if cfg.get("mlp_only_layers"):
        raise ValueError(f"{where}: field 'mlp_only_layers'={cfg['mlp_only_layers']!r} is not supported "
                         "(dense layers between MoE layers)")
    if cfg.get("shared_expert_intermediate_size"):
        raise ValueError(f"{where}: field 'shared_expert_intermediate_size' is not supported")
    return dict(num_experts=experts, moe_topk=topk, norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                moe_intermediate_size=_int_field(cfg, "moe_intermediate_size", where))


def read_hf_config(source: str | Path | Mapping[str, Any]) -> dict:
    """config.json as a dict, from a dict, a config.json path or a model directory."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise ValueError(f"{path}: no config.json (expected a Hugging Face model directory)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{path}: not readable JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level is not a JSON object")
    return data


def _int_field(cfg: Mapping[str, Any], name: str, where: str) -> int:
    value = cfg.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{where}: field {name!r} must be a positive integer, got {value!r}")
    return value


def _rope_theta(cfg: Mapping[str, Any], where: str) -> float:
    """transformers 5 keeps the theta in rope_parameters.rope_theta; older files in rope_theta."""
    params = cfg.get("rope_parameters")
    if isinstance(params, Mapping) and "rope_theta" in params:
        return float(params["rope_theta"])
    if params is not None and not isinstance(params, Mapping):
        raise ValueError(f"{where}: field 'rope_parameters' must be an object, got {params!r}")
    if isinstance(params, Mapping) and params and "rope_type" not in params:
        raise ValueError(f"{where}: field 'rope_parameters' has no rope_theta (per-layer-type RoPE is not supported)")
    return float(cfg.get("rope_theta", 10000.0))


def _check_supported(cfg: Mapping[str, Any], where: str) -> None:
    """What GPTSettings cannot express is refused, not silently approximated."""
    model_type = cfg.get("model_type")
    if model_type in UNCOVERED_MOE_TYPES:
        raise ValueError(f"{where}: field 'model_type'={model_type!r} is not supported (the Qwen3-MoE / Mixtral "
                         f"code does not cover it): {UNCOVERED_MOE_TYPES[model_type]}")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{where}: field 'model_type'={model_type!r} is not supported; "
                         f"supported: {list(SUPPORTED_MODEL_TYPES)}")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ValueError(f"{where}: field {flag!r}=true is not supported (no biases in the Megatron model)")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where}: field 'hidden_act'={act!r} is not supported (SwiGLU needs 'silu')")
    for field_name in ("rope_parameters", "rope_scaling"):
        params = cfg.get(field_name) or {}
        kind = params.get("rope_type", params.get("type")) if isinstance(params, Mapping) else params
        if kind not in (None, "default"):
            raise ValueError(f"{where}: field {field_name!r} has rope type {kind!r}; only unscaled "
                             "('default') RoPE is supported")
    factor = cfg.get("partial_rotary_factor", 1.0)
    if factor not in (None, 1, 1.0):
        raise ValueError(f"{where}: field 'partial_rotary_factor'={factor!r} is not supported (must be 1.0)")
    window = cfg.get("sliding_window")
    if window is not None and cfg.get("use_sliding_window", True) and window < cfg.get("max_position_embeddings", 0):
        raise ValueError(f"{where}: field 'sliding_window'={window} is not supported (full causal attention only)")
    layer_types = cfg.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(f"{where}: field 'layer_types' has {sorted(set(layer_types))}; only 'full_attention' "
                         "is supported")
    if cfg.get("quantization_config"):
        raise ValueError(f"{where}: field 'quantization_config' is set; quantized checkpoints are not supported")
