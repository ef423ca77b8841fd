"""The adapter-kind protocol: what a kind declares, and the slots a host offers it
(docs/design.md section 4b).

A HOST (`adapters/hosts/`) owns a frozen base layer, its geometry and the ONE collective of its
forward.  A KIND (LoRA, ...) never communicates: it declares its tensors and fills some of the
host's fixed slots, each a pure function of this rank's shards:

    slot               what the kind returns                          where the host puts it
    input_columns      extra columns [..., c] computed from the       column host: inside the input
                       local input                                    all-gather under SP (else after
                                                                      the copy_to), handed back to
                                                                      local_addend
    local_addend       y + addend (the kind does the add, so it can   column, replicated: after the
                       fold its scale into it)                        local matmul
    partial_addend     partial + addend                               row: before the ONE reduction
    reduction_payload  (partial', extra columns, rows): the partial   row: inside the ONE reduction;
                       (possibly changed), columns [..., c] reduced   every rank gets the rows summed
                       with it and rows (small, e.g. DoRA's squared   (under SP one copy per
                       row norms) that come back summed over TP       destination rank), handed to
                                                                      output_scale
    output_scale       f(y) per output feature, before the bias       column, replicated: after
                       (DoRA's m / ||W + s B A||; IA3's l, which      local_addend; row: after the
                       scales the bias too: `view.bias`)              reduction, with the reduced payload
    input_scale        x * scale (IA3 on the input)                   column: on the whole input (after
                                                                      the SP all-gather / copy_to);
                                                                      row: on x_i before the matmul;
                                                                      replicated: before the matmul
    weight_delta       dW_i, this shard's weight update (LoHa),       column, row, replicated: the base
                       shaped like W_i                                matmul runs on W_i + dW_i

A kind filling reduction_payload also provides `payload_rows(view)`, the input-independent part
of its rows: the host sums it over TP (one collective, outside the micro-batch) when it adds the
adapter (`initial_tensors`) and when it merges (`merged_delta`), and hands it over as
`AdapterView.reduced`.

A host refuses (NotImplementedError, naming the slot) a kind that fills a slot the host does not
implement; each host lists its slots in `AdapterHost.SLOTS`.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch

from parallel_adapters.distributed.sharding import ShardSpec
from parallel_adapters.distributed.geometry import LinearGeometry

INPUT_COLUMNS = "input_columns"
LOCAL_ADDEND = "local_addend"
PARTIAL_ADDEND = "partial_addend"
INPUT_SCALE = "input_scale"
OUTPUT_SCALE = "output_scale"
WEIGHT_DELTA = "weight_delta"
REDUCTION_PAYLOAD = "reduction_payload"
SLOTS = (INPUT_COLUMNS, LOCAL_ADDEND, PARTIAL_ADDEND, INPUT_SCALE, OUTPUT_SCALE, WEIGHT_DELTA, REDUCTION_PAYLOAD)
"""Every slot a kind may fill (module docstring); hosts implement a subset."""


@dataclass(frozen=True)
class TensorDecl:
    """One tensor of an adapter on one host, as the kind declares it."""

    name: str
    """Attribute on the host and state-dict segment: `<module>.<name>.<adapter>.weight`."""
    global_shape: tuple[int, ...]
    """The full (unsharded) shape."""
    spec: ShardSpec
    """How it is split over TP on this host's parallel mode."""
    spec_attribute: str | None = None
    """If set, the host publishes `spec` under this attribute name (LoRA: `spec_a`, `spec_b`)."""
    partial_grad: bool | None = None
    """Whether this rank's gradient is a partial sum over TP that `finalize_grads` must sum; None:
    exactly when the tensor is replicated (LoRA's A on column hosts, B on row hosts).  DoRA's
    magnitude on a row host is replicated but its gradient is complete without sequence parallelism."""


@dataclass(frozen=True)
class AdapterSettings:
    """What a kind derives from its config for one targeted module."""

    hparams: dict[str, Any]
    """Per-adapter values the host publishes as dicts keyed by adapter name (LoRA: `r`,
    `lora_alpha`, `scaling`); the names are the kind's `hyperparameters`."""
    dropout: float = 0.0
    """Dropout probability on the adapter input (0: none); the host draws the masks."""
    seed: int = 0
    """Base seed of the full-tensor initialisation and of the dropout streams."""
    rank_dropout: float = 0.0
    """LyCORIS' rank dropout (weight_delta kinds): the probability that a row of dW (an output
    feature) is zeroed in a training forward; 0: none."""
    module_dropout: float = 0.0
    """LyCORIS' module dropout: the probability that the adapter sits out a training forward; 0: none."""
    rank_dropout_scale: bool = False
    """Divide the kept rows by the mask's mean over all of dW's rows (PEFT's LoHa always does)."""


@dataclass(frozen=True)
class AdapterView:
    """What a kind's slot functions see of one adapter on one rank's host."""

    name: str
    kind: "AdapterKind"
    slots: frozenset[str]
    tensors: Mapping[str, torch.Tensor]
    """This rank's shards, by declared name."""
    hparams: Mapping[str, Any]
    dropout: Callable[[torch.Tensor], torch.Tensor] | None
    """The host's input dropout for this adapter; None when not training or p = 0."""
    geometry: LinearGeometry
    weight: torch.Tensor | None = None
    """The base weight shard the adapter applies to (the forward's, or the running merge's)."""
    reduced: torch.Tensor | None = None
    """`payload_rows` summed over TP (set by the host at add and merge time only)."""
    bias: torch.Tensor | None = None
    """The base bias shard (column: b_i like W's rows; row, replicated: whole), or None."""
    rank_mask: torch.Tensor | None = None
    """This training forward's rank-dropout multiplier over ALL of dW's rows [O] (the same on every
    TP rank; the host applies this rank's rows to weight_delta), or None."""


@dataclass(frozen=True)
class ReductionPayload:
    """What a kind puts into (and gets back from) a row host's ONE reduction."""

    partial: torch.Tensor | None = None
    """The partial output [..., O], possibly changed (None in what the host hands back)."""
    columns: torch.Tensor | None = None
    """Extra sequence-shaped columns [..., c], reduced along with the partial (SP: scattered)."""
    rows: torch.Tensor | None = None
    """A small tensor, summed over TP; every rank gets the whole sum (SP included)."""


class AdapterKind:
    """Base class of adapter kinds.  A kind module subclasses it, sets the class attributes and
    implements `settings`, `tensors`, `full_tensors`, `merged_delta` and the slots it fills; it
    is registered by name with `adapters.kinds.register_kind`.  Kinds hold no state: everything
    per adapter lives on the host."""

    name: str = ""
    """Registry key ("lora")."""
    config_class: type = type(None)
    """The config type `get_adapter_model` maps to this kind."""
    peft_type: str = ""
    """adapter_config.json's `peft_type` ("LORA")."""
    hyperparameters: tuple[str, ...] = ()
    """Names of the per-adapter dicts the host publishes (keys of AdapterSettings.hparams)."""
    pattern_fields: tuple[str, ...] = ()
    """Config fields mapping module-name patterns to values; a key matching no target is an error."""
    dropout_stream: str = ""
    """Prefix of this kind's dropout streams in Megatron's RNG tracker (checkpointed by name)."""
    slot_table: Mapping[str, frozenset[str]] = MappingProxyType({})
    """Parallel mode ("column", "row", "replicated") -> the slots this kind fills there."""
    tensor_axes: Mapping[str, tuple[int | None, int | None]] = MappingProxyType({})
    """Every tensor name the kind may declare -> (its axis along the base weight's rows, its axis
    along the base weight's columns), None where it has neither.  The offline tools need no
    geometry: export splits a fused module's tensor along its row axis into the HF modules' parts
    (q/k/v, gate/up; vocabulary padding dropped) and checks the column axis against the HF shape."""

    def accepts(self, config: Any) -> bool:
        """Whether `get_adapter_model` should pick this kind for `config` (default: its type)."""
        return isinstance(config, self.config_class)

    def axes(self, tensor_name: str, embedding: bool,
             hparams: Mapping[str, Any] | None = None) -> tuple[int | None, int | None]:
        """`tensor_axes[tensor_name]` on a linear layer or, `embedding`, on a lookup table, for a
        module of these hyperparameters (IA3's vector runs along the rows when it scales the
        output, along the columns when it scales the input)."""
        return self.tensor_axes[tensor_name]

    def accepts_module(self, config: Any, geometry: LinearGeometry) -> bool:
        """For a variant (`kinds.register_variant`): whether it takes this module from its kind."""
        return False

    def accepts_stored(self, config: Mapping[str, Any]) -> bool:
        """Whether a PEFT adapter_config.json of this kind's `peft_type` is this kind's."""
        return True

    def slots(self, parallel_mode: str) -> frozenset[str]:
        if parallel_mode not in self.slot_table:
            raise ValueError(f"adapter kind {self.name!r} has no form for a {parallel_mode!r} layer")
        return self.slot_table[parallel_mode]

    def settings(self, config: Any, module_name: str, geometry: LinearGeometry) -> AdapterSettings:
        """Per-module settings from the config; ValueError naming the field for a bad value."""
        raise NotImplementedError

    def tensors(self, geometry: LinearGeometry, hparams: Mapping[str, Any]) -> tuple[TensorDecl, ...]:
        """The declared tensors on a host of this geometry, in registration order."""
        raise NotImplementedError

    def full_tensors(self, config: Any, geometry: LinearGeometry, hparams: Mapping[str, Any],
                     generator: torch.Generator) -> dict[str, torch.Tensor]:
        """FULL initial tensors (float64, drawn from `generator` seeded identically on every rank),
        so TP=1 and TP=k start from the same adapter; the host keeps its shards."""
        raise NotImplementedError

    def merged_delta(self, view: AdapterView) -> torch.Tensor:
        """This shard's weight update, shaped like the host's weight shard, float32 or wider
        (`view.weight` is the weight it is added to)."""
        raise NotImplementedError

    def initial_tensors(self, view: AdapterView) -> dict[str, torch.Tensor]:
        """Local shards that replace `full_tensors`' once the base weight is known (DoRA's
        magnitude); default none."""
        return {}

    def merged_weight(self, view: AdapterView, weight: torch.Tensor) -> torch.Tensor:
        """The weight (shard) with the adapter folded in; by default W + merged_delta(view), added in
        float32 or wider and cast back to W's dtype."""
        delta = self.merged_delta(view)
        return (weight.to(delta.dtype) + delta).to(weight.dtype)

    def merged_bias(self, view: AdapterView, bias: torch.Tensor) -> torch.Tensor:
        """The bias (shard) with the adapter folded in; by default unchanged (IA3 scales it)."""
        return bias

    # -- offline: checkpoints and PEFT files (no geometry, no process group) -----------------

    def hf_parts(self, hparams: Mapping[str, Any]) -> tuple[str, ...] | None:
        """The HF modules (last names, "k_proj") of a fused Megatron module that this adapter covers,
        its row-axis tensors holding only their rows; None: all of them."""
        return None

    def hf_module_hparams(self, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """The hyperparameters of one HF module's share of a Megatron module's adapter (default: the same)."""
        return dict(hparams)

    def stored_hparams(self, config: Mapping[str, Any], module: str,
                       shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        """One module's hyperparameters from a checkpoint's adapter config and its tensors' shapes
        (EVA may have changed a module's rank)."""
        raise NotImplementedError

    def peft_hparams(self, peft_config: Mapping[str, Any], module: str,
                     shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        """One HF module's hyperparameters from a PEFT adapter_config.json (its patterns applied)."""
        raise NotImplementedError

    def low_rank_factors(self, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A [r, n], B [m, r]) whose product, times the `scaling` hyperparameter, is the update's
        magnitude, for kinds that have one (the export checks it cannot overflow); else None."""
        return None

    def peft_config(self, config: Mapping[str, Any], modules: Mapping[str, Mapping[str, Any]],
                    target_modules: list[str], base_model_name_or_path: str | None) -> dict[str, Any]:
        """PEFT's adapter_config.json for HF modules with these hyperparameters."""
        raise NotImplementedError

    def describe(self, hparams: Mapping[str, Any]) -> str:
        """A short summary for reprs and messages ("r=4")."""
        return ", ".join(f"{k}={v}" for k, v in hparams.items())

    def peft_key(self, tensor_name: str) -> str:
        """The key suffix PEFT stores this tensor under (after the module path, no adapter name)."""
        return f"{tensor_name}.weight"

    # -- slots (fill those in `slot_table`) ----------------------------------------------------

    def input_columns(self, view: AdapterView, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"adapter kind {self.name!r} does not fill {INPUT_COLUMNS}")

    def local_addend(self, view: AdapterView, x: torch.Tensor, y: torch.Tensor,
                     columns: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError(f"adapter kind {self.name!r} does not fill {LOCAL_ADDEND}")

    def partial_addend(self, view: AdapterView, x: torch.Tensor, partial: torch.Tensor,
                       columns: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError(f"adapter kind {self.name!r} does not fill {PARTIAL_ADDEND}")

    def reduction_payload(self, view: AdapterView, x: torch.Tensor, partial: torch.Tensor) -> ReductionPayload:
        raise NotImplementedError(f"adapter kind {self.name!r} does not fill {REDUCTION_PAYLOAD}")

    def payload_rows(self, view: AdapterView) -> torch.Tensor:
        """The input-independent rows of `reduction_payload` (per-rank partials)."""
        raise NotImplementedError(f"adapter kind {self.name!r} does not fill {REDUCTION_PAYLOAD}")

    def output_scale(self, view: AdapterView, x: torch.Tensor, y: torch.Tensor,
                     reduced: ReductionPayload | None) -> torch.Tensor:
        """f(y) before the bias; `reduced` is the summed payload on a row host, else None."""
        raise NotImplementedError(f"adapter kind {self.name!r} does not fill {OUTPUT_SCALE}")

    def input_scale(self, view: AdapterView, x: torch.Tensor) -> torch.Tensor:
        """x scaled per input feature (this host's input: whole on column hosts, x_i on row hosts)."""
        raise NotImplementedError(f"adapter kind {self.name!r} does not fill {INPUT_SCALE}")

    def weight_delta(self, view: AdapterView) -> torch.Tensor:
        """dW_i, added to `view.weight` for the base matmul (differentiable in the kind's tensors)."""
        raise NotImplementedError(f"adapter kind {self.name!r} does not fill {WEIGHT_DELTA}")


def rank_fields(modules: Mapping[str, Mapping[str, Any]], alpha_key: str) -> dict[str, Any]:
    """PEFT's rank fields for HF modules with these hyperparameters: the most common r and alpha
    (under `alpha_key`: "lora_alpha", "alpha"), and `rank_pattern` / `alpha_pattern` for the
    modules that differ, keyed by full HF module paths."""
    r0 = Counter(h["r"] for h in modules.values()).most_common(1)[0][0]
    alpha0 = Counter(h[alpha_key] for h in modules.values()).most_common(1)[0][0]
    return {"r": r0, alpha_key: alpha0,
            "rank_pattern": {m: h["r"] for m, h in sorted(modules.items()) if h["r"] != r0},
            "alpha_pattern": {m: h[alpha_key] for m, h in sorted(modules.items()) if h[alpha_key] != alpha0}}
