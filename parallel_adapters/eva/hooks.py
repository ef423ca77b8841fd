"""Capture the inputs of EVA's target layers: PEFT's input preparation, token masks, layouts,
structural input sharing.

Why hooks on the *wrapped* layers: the wrapper sees exactly what its frozen base sees (for a
column layer the TP-replicated `[S, B, I]`, or this rank's sequence chunk `[S/t, B, I]` under
sequence parallelism; for a row layer this rank's feature shard `[S, B, I/t]`), so the
statistics are computed on the very tensors the adapter will multiply.

Shared inputs are found from the model's *structure*: two layers share one decomposition when
they receive the same tensor object (same version) in one forward pass (q/k/v or gate/up of a
Hugging Face block), never by hashing activations.  Megatron already fuses q/k/v (`linear_qkv`)
and gate/up (`linear_fc1`), so there nothing is shared.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from parallel_adapters.adapters.pretrained import PEFT_PREFIX
from parallel_adapters.config import EvaConfig
from parallel_adapters.distributed.sharding import ShardSpec

LayerInputsFn = Callable[[Any, Any, str], torch.Tensor]
Sink = Callable[[str, torch.Tensor], None]


def token_mask(batch: Mapping[str, torch.Tensor], eva_config: EvaConfig) -> torch.Tensor:
    """[B, S] bool: tokens that enter the statistics (PEFT's language-modeling rule).

    attention_mask (1 = keep; all ones when absent) AND, with use_label_mask, labels !=
    label_mask_value, so padding and prompt tokens do not shape the components.
    """
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError("EVA batches must be dicts with 'input_ids' [B, S] (and optional attention_mask, labels) "
                         "for the default prepare_model_inputs_fn; for other batches pass "
                         "prepare_model_inputs_fn=None and prepare_layer_inputs_fn=None (every row) or your own")
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    labels = batch.get("labels")
    if eva_config.use_label_mask and labels is not None:
        mask = mask & (labels != eva_config.label_mask_value)
    return mask


# -- PEFT's input preparation (peft.tuners.lora.eva), by the same names and meanings ----------

def prepare_model_inputs_fn_language_modeling(model_input: Mapping[str, torch.Tensor], peft_config) -> torch.Tensor:
    """PEFT's default prepare_model_inputs_fn: indices [n, 2] (batch, position) of the kept tokens
    (`token_mask`).  Inside EVA the mask itself is kept as well (`TokenMask`), so the default
    row selection works in every layer's layout."""
    return token_mask(model_input, peft_config.eva_config or EvaConfig()).nonzero()


def prepare_layer_inputs_fn_language_modeling(layer_input: Any, model_input: torch.Tensor, layer_name: str) -> torch.Tensor:
    """PEFT's default prepare_layer_inputs_fn: the rows of the tokens `model_input` indexes, from a
    [B, S, I] input.  EVA recognises this function and selects the same tokens in each layer's own
    layout (Megatron's [S, B, I], sequence-parallel chunks, split inputs) with `masked_rows`."""
    x = layer_input if isinstance(layer_input, torch.Tensor) else layer_input[0]
    return x[model_input.T.unbind()]


def flatten_layer_inputs(layer_input: Any, model_input: Any, layer_name: str) -> torch.Tensor:
    """What PEFT does for prepare_layer_inputs_fn=None: every row of the first input, [-1, I]."""
    x = layer_input if isinstance(layer_input, torch.Tensor) else layer_input[0]
    return x.reshape(-1, x.shape[-1]) if x.ndim > 2 else x


def layer_inputs_fns(fns: Callable | Mapping[str, Callable] | None, names: list[str], strict: bool = True
                     ) -> dict[str, Callable | None]:
    """One prepare_layer_inputs_fn per layer: PEFT's dict by module name (with or without
    "base_model.model."; layers it does not name: None), or one function (or None) for all.
    `strict`: a name that is no target is an error (not under PP: it may be another stage's)."""
    if not isinstance(fns, Mapping):
        return {n: fns for n in names}
    by_name = {k.removeprefix(PEFT_PREFIX): f for k, f in fns.items()}
    unknown = sorted(set(by_name) - set(names))
    if unknown and strict:
        raise ValueError(f"prepare_layer_inputs_fn names modules that are not EVA targets: {unknown}; "
                         f"targets: {names}")
    return {n: by_name.get(n) for n in names}


class TokenMask:
    """EVA's model input under the default prepare_model_inputs_fn: the [B, S] bool `mask`;
    custom layer functions receive PEFT's form, `indices` = mask.nonzero() [n, 2]."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask
        self._indices: torch.Tensor | None = None

    @property
    def indices(self) -> torch.Tensor:
        if self._indices is None:
            self._indices = self.mask.nonzero()
        return self._indices


def _as_mask(model_input: Any, x: torch.Tensor, layout: str, seq_chunk: tuple[int, int] | None,
             name: str) -> torch.Tensor:
    """The [B, S] bool mask behind a model input: ours, a mask, or PEFT's indices [n, 2]."""
    if isinstance(model_input, TokenMask):
        return model_input.mask
    if isinstance(model_input, torch.Tensor) and model_input.dtype == torch.bool and model_input.ndim == 2:
        return model_input
    if isinstance(model_input, torch.Tensor) and model_input.ndim == 2 and model_input.shape[1] == 2 and x.ndim == 3:
        b, s = (x.shape[1], x.shape[0] * (seq_chunk[1] if seq_chunk else 1)) if layout == "sbh" else x.shape[:2]
        mask = torch.zeros(b, s, dtype=torch.bool, device=model_input.device)
        mask[model_input[:, 0], model_input[:, 1]] = True
        return mask
    raise ValueError(
        f"EVA layer {name}: prepare_layer_inputs_fn_language_modeling needs token indices [n, 2] or a [B, S] "
        f"mask from prepare_model_inputs_fn, got {type(model_input).__name__}; pass prepare_layer_inputs_fn=None "
        "(every row) or your own")


def masked_rows(x: torch.Tensor, mask: torch.Tensor, layout: str, seq_chunk: tuple[int, int] | None,
                name: str) -> torch.Tensor:
    """Rows [n, I] of the kept tokens of a layer input.

    layout "sbh": Megatron's [S, B, I] (seq_chunk = (rank, size) when the layer sees only its
    sequence-parallel chunk); "bsh": a Hugging Face style [B, S, I].  2-d inputs are taken as
    already flattened in that layout's token order.
    """
    m = mask.T if layout == "sbh" else mask
    if seq_chunk is not None:
        rank, size = seq_chunk
        if m.shape[0] % size:
            raise ValueError(f"EVA layer {name}: sequence length {m.shape[0]} does not split over {size} TP ranks")
        m = m.chunk(size, dim=0)[rank]
    m = m.to(x.device)
    if x.ndim == 2:
        m = m.reshape(-1)
    if tuple(x.shape[: m.ndim]) != tuple(m.shape):
        raise ValueError(
            f"EVA layer {name}: input of shape {tuple(x.shape)} does not match the token mask {tuple(m.shape)} "
            f"({layout} layout); pass prepare_layer_inputs_fn to say how to select this layer's rows")
    return x[m]


class ForwardDone(Exception):
    """Raised by a hook once every enabled layer's input of this forward has been captured: the
    rest of the forward (later layers, the LM head) cannot change EVA's statistics."""


class InputCapture:
    """Forward pre-hooks on the target layers.

    `enabled` names the layers whose inputs go to `sink` in this forward (the same set on every TP
    rank), except those in `elsewhere` (another TP rank decomposes them).  While `probing`, every
    hooked layer's input object is remembered for the duration of one forward, and a layer whose
    input `is` an earlier layer's (same `_version`) is recorded in `shared` as that layer's member
    and not captured again.  With `stop_early`, the hook raises `ForwardDone` as soon as every
    enabled layer has been captured in this forward, unless the probe saw a hooked layer called
    more than once per forward (then a later call could still bring rows).
    """

    def __init__(self, layers: Mapping[str, torch.nn.Module], sink: Sink,
                 layer_inputs_fns: Mapping[str, LayerInputsFn | None], tp_rank: int, tp_size: int):
        self.layers = dict(layers)
        self.sink = sink
        self.enabled: set[str] = set()
        self.model_input: Any = None
        self.probing = False
        self.shared: dict[str, str] = {}
        self.stop_early = False
        self.elsewhere: set[str] = set()
        self._seen: list[tuple[torch.Tensor, int, str]] = []
        self._calls: list[str] = []
        self._captured: set[str] = set()
        self._handles = []
        self._fns = {n: self._layer_fn(n, layer, layer_inputs_fns[n], tp_rank, tp_size)
                     for n, layer in self.layers.items()}

    @staticmethod
    def _layer_fn(name: str, layer: torch.nn.Module, fn: LayerInputsFn | None, tp_rank: int, tp_size: int
                  ) -> LayerInputsFn:
        """(x, model_input, name, args) -> rows [n, I_local] from `fn` (PEFT's meanings: None = every
        row; PEFT's language-modeling default = the kept tokens; else the caller's function)."""
        if fn is not None and fn is not prepare_layer_inputs_fn_language_modeling:
            # PEFT's signature: (the layer's positional inputs, model_input, name)
            return lambda x, model_input, n, args=None: fn(args if args else (x,), _peft_form(model_input), n)
        g = layer.geometry
        layout = "sbh" if g.parallel_mode in ("column", "row") else "bsh"
        chunk = (tp_rank, tp_size) if (g.parallel_mode == "column" and g.sequence_parallel) else None
        if g.parallel_mode == "row" and not g.input_is_parallel:  # the layer splits x itself
            spec = ShardSpec(dim=-1, chunks=layer.spec_a.chunks)
            local = lambda x: spec.shard(x, tp_rank, tp_size)  # noqa: E731
        else:
            local = lambda x: x  # noqa: E731
        if fn is None:
            return lambda x, model_input, n, args=None: flatten_layer_inputs(local(x), model_input, n)
        return lambda x, model_input, n, args=None: masked_rows(
            local(x), _as_mask(model_input, x, layout, chunk, n), layout, chunk, n)

    def attach(self) -> "InputCapture":
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_pre_hook(self._hook(name), with_kwargs=True))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._seen = []

    def end_probe(self) -> dict[str, str]:
        """Stop probing; {member: owner} for layers that received an owner's input object."""
        self.probing = False
        self._seen = []
        if len(set(self._calls)) < len(self._calls):
            self.stop_early = False
        self.elsewhere: set[str] = set()
        return dict(self.shared)

    def start_forward(self) -> None:
        self._captured = set()

    def _hook(self, name: str):
        def hook(module, args, kwargs):
            x = _first_tensor(args, kwargs, name)
            if self.probing:
                self._calls.append(name)
                version = _version(x)
                owner = next((n for t, v, n in self._seen if t is x and v == version), None)
                if owner is not None:
                    self.shared[name] = owner
                    return None
                self._seen.append((x, version, name))
            if name in self.enabled:
                if name not in self.elsewhere:
                    with torch.no_grad():
                        rows = self._fns[name](x, self.model_input, name, args)
                    if not isinstance(rows, torch.Tensor) or rows.ndim != 2:
                        raise ValueError(f"EVA layer {name}: prepare_layer_inputs_fn must return a 2-d tensor")
                    if _same_storage(rows, x):  # kept until the forward ends: the model may edit x in place
                        rows = rows.clone()
                    self.sink(name, rows.detach())
                self._captured.add(name)
                if self.stop_early and not self.probing and self._captured >= self.enabled:
                    raise ForwardDone
            return None
        return hook


def _first_tensor(args: tuple, kwargs: dict, name: str) -> torch.Tensor:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise ValueError(f"EVA layer {name}: no tensor input found in the forward call")


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except RuntimeError:  # tensors without storage (e.g. some wrapper subclasses): copy to be safe
        return True


def _version(x: torch.Tensor) -> int:
    """In-place edits between two layers make "the same object" a different input."""
    try:
        return x._version
    except RuntimeError:  # inference tensors have no version counter (and cannot be edited in place)
        return -1


def _peft_form(model_input: Any) -> Any:
    return model_input.indices if isinstance(model_input, TokenMask) else model_input
