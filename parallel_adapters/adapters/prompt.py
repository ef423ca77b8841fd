"""Prompt tuning (PEFT's PROMPT_TUNING) on a Megatron GPT: n trainable virtual-token embeddings
P [n, H], replicated over TP, prepended to every sequence on the first pipeline stage.

Legend: b batch, T real tokens, n virtual tokens, S = n + T, t = TP size, H width.

Where it hooks (docs/design.md section 4b): the GPT's `embedding` (LanguageModelEmbedding).
A pre-hook prepends n placeholder ids to input_ids, so the word embedding (with any adapter host
on it) runs its ONE reduction (all-reduce, or under sequence parallelism reduce-scatter along
the sequence) over S positions; a post-hook then replaces the placeholder rows with P.  The
embedding's output is [S, b, H] ([S/t, b, H] per rank under SP), so:
- without SP every TP rank replaces all n rows: P's gradient is complete on each rank;
- with SP rank i holds positions [i S/t, (i+1) S/t) and replaces the virtual ones among them:
  P's gradient is a per-rank partial, summed over TP by finalize_grads (its one all-reduce).
No collective is added per micro-batch.  Under SP, S must divide by t: the forward refuses other
lengths before the embedding's reduction (gpt_logits pads the real tokens on the right instead).

As PEFT: logits cover all S positions (virtual ones first); labels get n leading -100s
(`extend_labels`); positions are 0..S-1 (rotary by sequence index, as transformers'
cache_position).  Embedding dropout (Megatron's hidden_dropout) does not reach the virtual rows;
HF Llama has no embedding dropout at all.

P-tuning (PromptEncoderConfig) takes the same path with P = its encoder's output, computed once
per forward on the first stage (adapters/p_tuning.py); under SP the encoder's gradients are the
per-rank partials finalize_grads sums.

The stage's GPTModel records n as `prepended_tokens`, which Megatron's schedules (mcore/schedule.py)
read for the pipeline's sequence length on every stage.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from parallel_adapters.adapters import p_tuning
from parallel_adapters.config import PromptEncoderConfig, PromptTuningConfig
from parallel_adapters.distributed import collectives
from parallel_adapters.distributed.groups import ParallelGroups
from parallel_adapters.distributed.sharding import REPLICATED, ShardedTensor

IGNORE_INDEX = -100
"""PEFT's (and transformers') label of positions left out of the loss."""
PLACEHOLDER_ID = 0
"""The id looked up at virtual positions before P replaces those rows."""
KIND_NAME = "prompt_tuning"
"""A checkpoint's adapter_kind for a prompt adapter (not a per-layer kind: no kinds registry entry)."""
TENSOR_PREFIX = "prompt_tuning.prompt_embeddings."
"""The checkpoint key of adapter `name`'s prompt is f"{TENSOR_PREFIX}{name}.weight"."""


class PromptTuning(nn.Module):
    """The prompt adapters of one GPT stage: `prompt_embeddings.<adapter>.weight` [n, H] (on the
    stage that holds the embedding; later stages keep only n, for the pipeline's shapes)."""

    def __init__(self, groups: ParallelGroups):
        super().__init__()
        self.prompt_embeddings = nn.ModuleDict()
        self.num_virtual_tokens: dict[str, int] = {}
        self.active: str | None = None
        self.disabled = False
        self.groups = groups
        self.sequence_parallel = False
        self.hooks: list = []

    def running(self) -> str | None:
        """The adapter whose virtual tokens the forward prepends now, or None."""
        return None if self.disabled or self.active not in self.num_virtual_tokens else self.active

    def tensor(self, name: str) -> torch.Tensor | None:
        """Adapter `name`'s n rows [n, H]: the trained table, or (P-tuning) its encoder's output."""
        holder = self.prompt_embeddings[name] if name in self.prompt_embeddings else None
        if holder is None:
            return None
        return holder.weight if isinstance(holder, _Holder) else holder()

    def params(self, name: str) -> dict[str, nn.Parameter]:
        """Adapter `name`'s trainable tensors by their names under the holder (none off the first stage)."""
        holder = self.prompt_embeddings[name] if name in self.prompt_embeddings else None
        return {} if holder is None else dict(holder.named_parameters())

    def prepended(self) -> int:
        name = self.running()
        return 0 if name is None else self.num_virtual_tokens[name]


class _Holder(nn.Module):
    def __init__(self, tensor: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(tensor)
        self.weight.adapter_tensor = True  # not a base weight (mcore.hf_bridge skips it)


def is_prompt_config(config: object) -> bool:
    """Prompt tuning or P-tuning: virtual tokens prepended on the embedding."""
    return isinstance(config, (PromptTuningConfig, PromptEncoderConfig))


def prompt_module(model: nn.Module) -> PromptTuning | None:
    return getattr(model, "prompt_tuning", None)


def add_prompt_adapter(model: nn.Module, config: PromptTuningConfig | PromptEncoderConfig, name: str,
                       groups: ParallelGroups) -> None:
    """Add prompt adapter `name` to this GPT stage (initialised per config) and make it the one
    that runs if none runs yet."""
    prompt = prompt_module(model)
    if prompt is None:
        prompt = PromptTuning(groups)
        model.prompt_tuning = prompt
        _install_hooks(model, prompt)
    if name in prompt.num_virtual_tokens:
        raise ValueError(f"prompt adapter {name!r} already exists")
    if any(n != name for n in prompt.num_virtual_tokens):
        raise ValueError(f"prompt adapter {name!r}: this model already has prompt adapter(s) "
                         f"{sorted(prompt.num_virtual_tokens)}; one prompt adapter per model is supported")
    embedding = getattr(model, "embedding", None)
    if embedding is not None:
        if getattr(embedding, "add_position_embedding", False):
            raise ValueError("PromptTuningConfig: the model adds learned absolute position embeddings; prompt "
                             "tuning here needs rotary positions (position_embedding_type='rope')")
        prompt.sequence_parallel = bool(embedding.config.sequence_parallel) and groups.tp_size > 1
        if isinstance(config, PromptEncoderConfig):
            if config.encoder_dropout and groups.tp_size > 1:
                raise ValueError("PromptEncoderConfig.encoder_dropout > 0 with tensor parallelism: each TP rank "
                                 "would draw its own LSTM dropout mask for the replicated encoder; set it to 0")
            weight = embedding.word_embeddings.weight
            prompt.prompt_embeddings[name] = p_tuning.build_encoder(config, weight.shape[1], weight.device)
        else:
            table = initial_prompt(config, embedding.word_embeddings, _vocab_size(model), groups)
            prompt.prompt_embeddings[name] = _Holder(table)
    prompt.num_virtual_tokens[name] = config.num_virtual_tokens
    if prompt.active is None:
        prompt.active = name
    sync(model)


def sync(model: nn.Module) -> None:
    """Record how many positions the forward prepends now (read by the schedules and gpt_logits)."""
    prompt = prompt_module(model)
    model.prepended_tokens = 0 if prompt is None else prompt.prepended()


def set_active(model: nn.Module, name: str | None) -> None:
    prompt = prompt_module(model)
    if prompt is not None:
        prompt.active = name if name in prompt.num_virtual_tokens else None
        sync(model)


def set_disabled(model: nn.Module, disabled: bool) -> None:
    prompt = prompt_module(model)
    if prompt is not None:
        prompt.disabled = disabled
        sync(model)


def delete(model: nn.Module, name: str) -> None:
    prompt = prompt_module(model)
    if prompt is not None and name in prompt.num_virtual_tokens:
        del prompt.num_virtual_tokens[name]
        if name in prompt.prompt_embeddings:
            del prompt.prompt_embeddings[name]
        if prompt.active == name:
            prompt.active = None
        sync(model)


def remove(model: nn.Module) -> None:
    """Take prompt tuning off the model (hooks, tensors, the recorded prepended length)."""
    prompt = prompt_module(model)
    if prompt is not None:
        for hook in prompt.hooks:
            hook.remove()
        del model.prompt_tuning
        sync(model)


def trainable_tensors(model: nn.Module, name: str) -> list[nn.Parameter]:
    prompt = prompt_module(model)
    return [] if prompt is None else list(prompt.params(name).values())


def partial_grad_entries(model: nn.Module) -> list[tuple[object, list[nn.Parameter]]]:
    """(TP group, parameters whose gradient is a per-rank partial): P (or P-tuning's encoder) under
    sequence parallelism."""
    prompt = prompt_module(model)
    if prompt is None or not prompt.sequence_parallel:
        return []
    params = [p for h in prompt.prompt_embeddings.values() for p in h.parameters() if p.requires_grad]
    for param in params:
        if param.grad is None:  # a rank whose sequence chunk held no virtual position: its share is 0
            param.grad = torch.zeros_like(param)
    return [(prompt.groups.tp_group, params)]


def check_hooked_tp_sum(model: nn.Module) -> None:
    """A per-gradient TP-sum hook (DeepSpeed's tp_sum='hooks') cannot serve a prompt under SP: a TP
    rank whose chunk holds no virtual position produces no gradient to hook, the others would wait."""
    prompt = prompt_module(model)
    if prompt is not None and prompt.sequence_parallel:
        raise ValueError("tp_sum='hooks' cannot sum a prompt-learning adapter's gradient under sequence parallelism "
                         "(a TP rank whose chunk holds no virtual position produces none, so the others' "
                         "all-reduce would wait); use tp_sum='auto' (DeepSpeed's coalesce_grad_reduction)")


def sharded_tensors(model: nn.Module, name: str) -> dict[str, ShardedTensor]:
    """`prompt_tuning.prompt_embeddings.<name>.weight` (P-tuning: `.<name>.<encoder tensor>`),
    replicated over TP, on the first stage."""
    prompt = prompt_module(model)
    params = {} if prompt is None else prompt.params(name)
    return {f"{TENSOR_PREFIX}{name}.{key}": ShardedTensor(t.detach(), REPLICATED, tuple(t.shape))
            for key, t in params.items()}


# -- init ----------------------------------------------------------------------------------------

def init_token_ids(config: PromptTuningConfig, vocab_size: int) -> torch.Tensor | None:
    """The vocabulary rows the prompt starts from (None for RANDOM): TEXT's ids cut or repeated to
    n as PEFT does; SAMPLE_VOCAB's n uniform draws from the real vocabulary (seeded)."""
    n = config.num_virtual_tokens
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        generator = torch.Generator().manual_seed(config.seed)
        return torch.randint(0, vocab_size, (n,), generator=generator)
    if config.prompt_tuning_init != "TEXT":
        return None
    ids = config.init_token_ids
    if ids is None:
        raise ValueError("PromptTuningConfig.prompt_tuning_init='TEXT': set init_token_ids to the tokenised "
                         "prompt_tuning_init_text, e.g. config.replace(init_token_ids=parallel_adapters.interop."
                         "hf_tokenizer.tokenize_prompt_text(text, tokenizer_name_or_path))")
    if not ids:
        raise ValueError("PromptTuningConfig.init_token_ids is empty")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"PromptTuningConfig.init_token_ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    ids = list(ids) * math.ceil(n / len(ids))
    return torch.tensor(ids[:n], dtype=torch.long)


@torch.no_grad()
def initial_prompt(config: PromptTuningConfig, word_embeddings: nn.Module, vocab_size: int,
                   groups: ParallelGroups) -> torch.Tensor:
    """P [n, H] in float32: N(0, 1) (RANDOM, nn.Embedding's init) or the embedding rows of
    `init_token_ids`, read from the vocab-parallel table: each rank contributes the rows it owns
    and one all-reduce over TP sums them (at init, never per micro-batch)."""
    weight = word_embeddings.weight
    ids = init_token_ids(config, vocab_size)
    if ids is None:
        generator = torch.Generator().manual_seed(config.seed)
        return torch.randn(config.num_virtual_tokens, weight.shape[1], generator=generator).to(weight.device)
    start = getattr(word_embeddings, "vocab_start_index", 0)
    end = getattr(word_embeddings, "vocab_end_index", weight.shape[0])
    ids = ids.to(weight.device)
    owned = (ids >= start) & (ids < end)
    rows = F.embedding((ids - start).masked_fill(~owned, 0), weight).float()
    rows = rows.masked_fill(~owned.unsqueeze(-1), 0.0).contiguous()
    return collectives.all_reduce_(rows, groups.tp_group) if groups.tp_size > 1 else rows


def _vocab_size(model: nn.Module) -> int:
    return int(getattr(model, "unpadded_vocab_size", None) or model.vocab_size)


# -- forward -------------------------------------------------------------------------------------

def _install_hooks(model: nn.Module, prompt: PromptTuning) -> None:
    embedding = getattr(model, "embedding", None)
    if embedding is None:
        return  # a later pipeline stage: it only receives the longer sequence

    def prepend(module: nn.Module, args: tuple, kwargs: dict):
        name = prompt.running()
        if name is None:
            return None
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        n, t = prompt.num_virtual_tokens[name], prompt.groups.tp_size
        if prompt.sequence_parallel and (n + ids.shape[1]) % t:
            raise ValueError(
                f"prompt tuning under sequence parallelism: {n} virtual tokens + {ids.shape[1]} tokens = "
                f"{n + ids.shape[1]} positions do not split over tensor_parallel={t}; pad the input on the right "
                "(gpt_logits does) and leave the padding out of the loss")
        ids = torch.cat([ids.new_full((ids.shape[0], n), PLACEHOLDER_ID), ids], dim=1)
        if "input_ids" in kwargs:
            return args, {**kwargs, "input_ids": ids}
        return (ids, *args[1:]), kwargs

    def replace(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
        name = prompt.running()
        if name is None:
            return None
        table = prompt.tensor(name)
        output = replace_virtual_rows(output, table, prompt.groups.tp_rank if prompt.sequence_parallel else 0)
        if table.requires_grad and torch.is_grad_enabled() and not output.requires_grad:
            # an SP rank whose chunk holds no virtual position must still run the backward (and its
            # collectives) with the others: as PEFT's enable_input_require_grads
            output.requires_grad_(True)
        return output

    prompt.hooks = [embedding.register_forward_pre_hook(prepend, with_kwargs=True),
                    embedding.register_forward_hook(replace, with_kwargs=True)]


def replace_virtual_rows(x_sbh: torch.Tensor, prompt: torch.Tensor, chunk_index: int) -> torch.Tensor:
    """x [s, b, H] holds positions [chunk_index * s, (chunk_index + 1) * s) of the sequence; its
    rows at positions < n become prompt's (the rest is untouched, and so is their gradient)."""
    s = x_sbh.shape[0]
    start = chunk_index * s
    k = max(0, min(prompt.shape[0] - start, s))
    if k == 0:
        return x_sbh
    rows = prompt[start:start + k].to(x_sbh.dtype).unsqueeze(1).expand(k, x_sbh.shape[1], x_sbh.shape[2])
    return torch.cat([rows, x_sbh[k:]], dim=0)


# -- labels --------------------------------------------------------------------------------------

def extend_labels(labels: torch.Tensor, num_virtual_tokens: int) -> torch.Tensor:
    """PEFT's labels for the prompted sequence: n leading IGNORE_INDEX, then `labels` [b, T]."""
    prefix = labels.new_full((labels.shape[0], num_virtual_tokens), IGNORE_INDEX)
    return torch.cat([prefix, labels], dim=1)


def megatron_targets(labels: torch.Tensor, num_virtual_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT/transformers labels [b, T] (unshifted: position p's logits predict label p + 1) ->
    (targets [b, n + T] for GPTModel's `labels=`, whose position p predicts targets[p], and the
    float loss mask): the extended labels shifted left, IGNORE_INDEX at the end, ignored
    positions given target 0 and mask 0."""
    extended = extend_labels(labels, num_virtual_tokens)
    shifted = torch.cat([extended[:, 1:], extended.new_full((extended.shape[0], 1), IGNORE_INDEX)], dim=1)
    mask = shifted != IGNORE_INDEX
    return shifted.masked_fill(~mask, 0), mask.float()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_virtual_tokens: int) -> torch.Tensor:
    """transformers' causal-LM loss of PEFT's prompted forward: logits [b, n + T, V] (virtual
    positions first), labels [b, T] unshifted; mean over the positions whose label is not ignored."""
    targets, mask = megatron_targets(labels, num_virtual_tokens)
    per_token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return (per_token * mask.flatten().to(per_token.dtype)).sum() / mask.sum()


# -- PEFT's files ----------------------------------------------------------------------------------

PEFT_KEY = "prompt_embeddings"
"""PEFT's key of the prompt in adapter_model.safetensors (get_peft_model_state_dict)."""
_PEFT_FIELDS = ("num_virtual_tokens", "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                "tokenizer_kwargs")


def peft_config_fields(config: dict, prompt_shape: tuple, num_attention_heads: int, num_layers: int,
                       base_model_name_or_path: str | None) -> dict:
    """adapter_config.json in PEFT's PromptTuningConfig fields for a prompt [n, token_dim] (what
    PEFT's own save writes).  TEXT init without both the text and a tokenizer path, which PEFT's
    config refuses, is written as RANDOM: the trained prompt is in the file, the init no longer
    matters."""
    n, width = prompt_shape
    if config.get("num_virtual_tokens", n) != n:
        raise ValueError(f"the adapter config says num_virtual_tokens={config['num_virtual_tokens']}, "
                         f"the prompt has {n} rows")
    data = {k: config.get(k) for k in _PEFT_FIELDS}
    if data["prompt_tuning_init"] == "TEXT" and not (data["prompt_tuning_init_text"] and data["tokenizer_name_or_path"]):
        data.update(prompt_tuning_init="RANDOM", tokenizer_kwargs=None)
    data.update(num_virtual_tokens=n, num_transformer_submodules=1, peft_type="PROMPT_TUNING", task_type="CAUSAL_LM",
                token_dim=width, num_attention_heads=num_attention_heads, num_layers=num_layers,
                base_model_name_or_path=base_model_name_or_path, inference_mode=True, revision=None,
                modules_to_save=None, auto_mapping=None)
    return data


def check_not_merging(names: Iterator[str] | list[str], configs: dict) -> None:
    """Prompt adapters add input positions, not a weight delta: nothing to merge."""
    prompts = [n for n in names if is_prompt_config(configs.get(n))]
    if prompts:
        raise ValueError(f"cannot merge prompt adapter(s) {prompts}: prompt tuning prepends virtual tokens to the "
                         "input and changes no weight, so there is no delta to fold into the base (PEFT cannot "
                         "merge prompt learning adapters either); keep the adapter and run the model with it")
