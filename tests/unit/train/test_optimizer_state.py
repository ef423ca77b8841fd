"""The pickle-free optimizer state codec (train/zero_state.py: flatten_state / unflatten_state):
nested optimizer state <-> {path: tensor or JSON scalar} + a JSON layout, as the checkpoint's
per-rank safetensors + JSON hold it."""
from __future__ import annotations

import collections
import json

import pytest
import torch

from parallel_adapters.train.zero_state import LAYOUT_KEY, flatten_state, unflatten_state

P = "deepspeed/optimizer/"


def _through_files(flat: dict) -> dict:
    """What a checkpoint gives back: tensors as copies, scalars through strict JSON."""
    tensors = {k: v.clone() for k, v in flat.items() if isinstance(v, torch.Tensor)}
    scalars = json.loads(json.dumps({k: v for k, v in flat.items() if not isinstance(v, torch.Tensor)},
                                    allow_nan=False))
    return {**tensors, **scalars}


def _assert_same(a, b, where="state"):
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k!r}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}/{i}")
    elif hasattr(a, "__dict__") and not isinstance(a, type):
        _assert_same(vars(a), vars(b), where)
    else:
        assert a == b or (a != a and b != b), where


def _adamw_state() -> dict:
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.01)
    for _ in range(2):
        opt.zero_grad()
        sum(p.square().sum() for p in params).backward()
        opt.step()
    return opt.state_dict()


def test_torch_optimizer_state_round_trips_exactly():
    state = _adamw_state()
    flat = flatten_state(state, P)
    assert isinstance(flat[P + "state/0/exp_avg"], torch.Tensor)
    assert flat[P + "param_groups/0/lr"] == 0.1 and flat[P + "param_groups/0/betas/1"] == 0.999
    assert all(isinstance(v, (torch.Tensor, int, float, str, type(None))) for v in flat.values())
    back = unflatten_state(_through_files(flat), P)
    _assert_same(state, back)
    assert isinstance(back["param_groups"][0]["betas"], tuple) and list(back["state"]) == [0, 1]
    assert flat[P + "state/0/exp_avg"].data_ptr() != state["state"][0]["exp_avg"].data_ptr()  # a copy


def test_restored_state_continues_bit_exactly():
    torch.manual_seed(0)
    make = lambda: [torch.nn.Parameter(torch.arange(12.0).reshape(3, 4) / 7)]  # noqa: E731

    def steps(opt, params, n):
        for _ in range(n):
            opt.zero_grad()
            (params[0].sin().sum()).backward()
            opt.step()

    a = make()
    opt_a = torch.optim.AdamW(a, lr=0.05)
    steps(opt_a, a, 5)
    b = make()
    opt_b = torch.optim.AdamW(b, lr=0.05)
    steps(opt_b, b, 2)
    flat = _through_files(flatten_state(opt_b.state_dict(), P))
    c = [torch.nn.Parameter(b[0].detach().clone())]
    opt_c = torch.optim.AdamW(c, lr=0.05)
    opt_c.load_state_dict(unflatten_state(flat, P))
    steps(opt_c, c, 3)
    assert torch.equal(a[0], c[0])


def test_deepspeed_objects_round_trip():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from parallel_adapters.train.engine import deepspeed_classes

    classes = deepspeed_classes()[0]

    state = {
        "loss_scaler": LossScaler(scale=1.0),
        "dynamic": DynamicLossScaler(init_scale=2.0**16, scale_window=1000, min_scale=1.0, delayed_shift=2,
                                     consecutive_hysteresis=False, dtype=torch.float16),
        "zero_stage": ZeroStageEnum.gradients,
        "partition_count": [2],
        "param_slice_mappings": [collections.OrderedDict(
            [("a/b.weight", fragment_address(numel=4, start=0)), ("c%d", fragment_address(numel=2, start=4))])],
        "fp32": [torch.randn(6)],
        "overflow": False,
        "inf": float("inf"),
        "nothing": None,
        "tuple": (1, "x", 2.5),
        "empty": {},
    }
    with pytest.raises(ValueError, match="loss_scaler.*LossScaler cannot be stored"):
        flatten_state(state, P)  # only the classes it is given
    flat = flatten_state(state, P, classes)
    assert P + "param_slice_mappings/0/a%2Fb.weight/numel" in flat  # '/' inside a key is escaped
    assert P + "loss_scaler/cur_scale" in flat
    with pytest.raises(ValueError, match="not a class this loader rebuilds"):
        unflatten_state(_through_files(flat), P)
    back = unflatten_state(_through_files(flat), P, classes)
    _assert_same(state, back)
    assert back["zero_stage"] is ZeroStageEnum.gradients
    assert isinstance(back["param_slice_mappings"][0], collections.OrderedDict)
    assert back["dynamic"].dtype is torch.float16


class _Opaque:
    def __init__(self):
        self.x = 1


@pytest.mark.parametrize("bad, message", [
    ({"fn": _Opaque()}, r"'deepspeed/optimizer/fn'.*_Opaque cannot be stored"),
    ({"s": {1, 2}}, r"'deepspeed/optimizer/s'.*set cannot be stored"),
    ({"k": {(1, 2): 3}}, r"dict key \(1, 2\)"),
    ({"k": {0: 1, "0": 2}}, r"ambiguous"),
])
def test_unstorable_state_is_refused_naming_its_path(bad, message):
    with pytest.raises(ValueError, match=message):
        flatten_state(bad, P)


def test_tampered_or_incomplete_state_is_refused():
    flat = flatten_state({"a": torch.zeros(2), "b": 3}, P)
    with pytest.raises(ValueError, match="is missing"):
        unflatten_state({k: v for k, v in flat.items() if k != P + "a"}, P)
    with pytest.raises(ValueError, match="entries the layout does not name"):
        unflatten_state({**flat, P + "extra": 1}, P)
    with pytest.raises(ValueError, match="should be a tensor"):
        unflatten_state({**flat, P + "a": 1}, P)
    with pytest.raises(ValueError, match="__layout__"):
        unflatten_state({k: v for k, v in flat.items() if not k.endswith(LAYOUT_KEY)}, P)
    evil = json.dumps({"object": "os.system", "attrs": {"dict": [], "ordered": False}})
    with pytest.raises(ValueError, match="not a class this loader rebuilds"):
        unflatten_state({P + LAYOUT_KEY: evil}, P)
    evil = json.dumps({"enum": "subprocess.Popen", "value": "ls"})
    with pytest.raises(ValueError, match="not a class this loader rebuilds"):
        unflatten_state({P + LAYOUT_KEY: evil}, P)
