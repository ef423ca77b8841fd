"""Hosts (`adapters/hosts/linear.py`, `hosts/base.py`) with test-only adapter kinds, emulated TP 1..8.

Reference: dense float64 computations.  Each emulated rank builds its own host (geometry of rank
i of t, with GROUP_OF_ONE, so the host's collectives are identities) and the collectives are
emulated here by sum / concatenation, as in test_tp_emulation.py.  The kinds below are declared
only in this file: `DenseDelta` fills local_addend (column, replicated) and partial_addend (row);
`SquaredColumns` fills input_columns + local_addend on a column host.
"""
from dataclasses import dataclass
from types import MappingProxyType

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from parallel_adapters import ParallelGroups, get_adapter_model
from parallel_adapters.adapters import kinds
from parallel_adapters.adapters.hosts.linear import ColumnParallelHost, ReplicatedHost, RowParallelHost
from parallel_adapters.adapters.kinds.protocol import (
    INPUT_COLUMNS, LOCAL_ADDEND, PARTIAL_ADDEND, AdapterKind, AdapterSettings, TensorDecl,
)
from parallel_adapters.distributed.groups import GROUP_OF_ONE
from parallel_adapters.distributed.sharding import REPLICATED, ShardSpec
from parallel_adapters.mcore.compat import LinearGeometry

TOL = 1e-10
T, IN_F, OUT_F = 8, 16, 48


@dataclass(frozen=True)
class DeltaConfig:
    """The PEFT fields target matching reads, plus the toy kind's own."""

    target_modules: tuple = ("q_proj",)
    exclude_modules: tuple | None = None
    layers_to_transform: tuple | None = None
    layers_pattern: str | None = None
    bias: str = "none"
    modules_to_save: tuple | None = None
    seed: int = 0
    delta_scale: float = 0.5


class DenseDelta(AdapterKind):
    """y += c x D^T, D [O, I] split like the base weight."""

    name = "dense-delta"
    config_class = DeltaConfig
    hyperparameters = ("delta_scale",)
    slot_table = MappingProxyType({"column": frozenset({LOCAL_ADDEND}), "row": frozenset({PARTIAL_ADDEND}),
                                   "replicated": frozenset({LOCAL_ADDEND})})

    def settings(self, config, module_name, geometry):
        return AdapterSettings({"delta_scale": config.delta_scale}, 0.0, config.seed)

    def tensors(self, g, hparams):
        spec = {"column": ShardSpec(dim=0, chunks=g.chunks), "row": ShardSpec(dim=1, chunks=g.chunks),
                "replicated": REPLICATED}[g.parallel_mode]
        return (TensorDecl("delta", (g.out_features, g.in_features), spec),)

    def full_tensors(self, config, g, hparams, generator):
        return {"delta": torch.randn(g.out_features, g.in_features, generator=generator, dtype=torch.float64)}

    def merged_delta(self, view):
        return view.hparams["delta_scale"] * view.tensors["delta"]

    def local_addend(self, view, x, y, columns):
        assert columns is None
        return y + view.hparams["delta_scale"] * F.linear(x, view.tensors["delta"])

    partial_addend = local_addend

    @staticmethod
    def dense(x, full, hparams):
        return hparams["delta_scale"] * F.linear(x, full["delta"])


class SquaredColumns(AdapterKind):
    """Column hosts only: c = (x*x) P^T (P [k, I] replicated: k input columns), y += c Q_i^T."""

    name = "squared-columns"
    hyperparameters = ("k",)
    slot_table = MappingProxyType({"column": frozenset({INPUT_COLUMNS, LOCAL_ADDEND})})

    def tensors(self, g, hparams):
        return (TensorDecl("proj_p", (hparams["k"], g.in_features), REPLICATED),
                TensorDecl("proj_q", (g.out_features, hparams["k"]), ShardSpec(dim=0, chunks=g.chunks)))

    def input_columns(self, view, x):
        return F.linear(x * x, view.tensors["proj_p"])

    def local_addend(self, view, x, y, columns):
        return y + F.linear(columns, view.tensors["proj_q"])

    @staticmethod
    def dense(x, full, hparams):
        return F.linear(F.linear(x * x, full["proj_p"]), full["proj_q"])


class Fills(AdapterKind):
    """A kind that fills the given slots everywhere (for the refusals)."""

    def __init__(self, *slots, tensor="t", hparam="h"):
        self.name, self.hyperparameters = "fills", (hparam,)
        self.slot_table = {m: frozenset(slots) for m in ("column", "row", "replicated")}
        self._tensor = tensor

    def tensors(self, g, hparams):
        return (TensorDecl(self._tensor, (2, g.in_features), REPLICATED),)


def _geometry(mode, tp, rank, chunks=1, sp=False):
    return LinearGeometry(mode, IN_F, OUT_F, chunks, GROUP_OF_ONE, tp, rank, sp, False, True, False)


def _full(kind, hparams, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {d.name: d.global_shape for d in kind.tensors(_geometry("column", 1, 0), hparams)}
    return {n: torch.randn(*s, generator=g, dtype=torch.float64) for n, s in shapes.items()}


def _problem(seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return mk(T, IN_F), mk(OUT_F, IN_F), mk(OUT_F), mk(T, OUT_F)


def _dense_grads(kind, hparams, full, x, w, bias, dy):
    leaves = {n: t.clone().requires_grad_() for n, t in full.items()}
    xr = x.clone().requires_grad_()
    y = F.linear(xr, w, bias) + kind.dense(xr, leaves, hparams)
    y.backward(dy)
    return y.detach(), xr.grad, {n: t.grad for n, t in leaves.items()}


def _host(cls, mode, tp, rank, chunks, sp, w_local, bias_local, kind, hparams, full):
    base = nn.Linear(w_local.shape[1], w_local.shape[0], bias=bias_local is not None).double()
    with torch.no_grad():
        base.weight.copy_(w_local)
        if bias_local is not None:
            base.bias.copy_(bias_local)
    base.requires_grad_(False)
    host = cls(base, _geometry(mode, tp, rank, chunks, sp), "proj")
    host.add_adapter("default", kind, AdapterSettings(dict(hparams)), full)
    return host


def _check_tensor_grads(hosts, ref_grads, tp):
    """Split tensors: unsharded rank gradients; replicated ones: summed over ranks (finalize_grads),
    and exactly those are what partial_grad_parameters names when tp > 1."""
    for decl in hosts[0].tensor_decls("default"):
        grads = [h.adapter_tensors("default")[decl.name].grad for h in hosts]
        full = sum(grads) if decl.spec.replicated else decl.spec.unshard(grads)
        torch.testing.assert_close(full, ref_grads[decl.name], atol=TOL, rtol=0, msg=decl.name)
        partial = {id(p) for p in hosts[0].partial_grad_parameters()}
        assert (id(hosts[0].adapter_tensors("default")[decl.name]) in partial) == (decl.spec.replicated and tp > 1)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("chunks", [1, 2])
@pytest.mark.parametrize("sp", [False, True])
@pytest.mark.parametrize("kind,hparams", [(DenseDelta(), {"delta_scale": 0.5}), (SquaredColumns(), {"k": 3})],
                         ids=["local_addend", "input_columns"])
def test_column_host_matches_dense(kind, hparams, tp, chunks, sp):
    x, w, bias, dy = _problem(seed=tp * 10 + chunks)
    full = _full(kind, hparams, seed=tp)
    y_ref, dx_ref, ref_grads = _dense_grads(kind, hparams, full, x, w, bias, dy)
    w_spec, out_spec = ShardSpec(dim=0, chunks=chunks), ShardSpec(dim=1, chunks=chunks)
    hosts, ys, dxs = [], [], []
    for rank in range(tp):
        host = _host(ColumnParallelHost, "column", tp, rank, chunks, sp, w_spec.shard(w, rank, tp),
                     w_spec.shard(bias, rank, tp), kind, hparams, full)
        xi = x.clone().requires_grad_()  # SP: the emulated all-gather hands every rank all of x
        yi, out_bias = host(xi)
        assert out_bias is None
        yi.backward(out_spec.shard(dy, rank, tp))
        hosts.append(host); ys.append(yi.detach()); dxs.append(xi.grad)
    torch.testing.assert_close(out_spec.unshard(ys), y_ref, atol=TOL, rtol=0)
    torch.testing.assert_close(sum(dxs), dx_ref, atol=TOL, rtol=0)  # the copy_to all-reduce / reduce-scatter
    _check_tensor_grads(hosts, ref_grads, tp)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("chunks", [1, 2])
def test_row_host_partial_addend_matches_dense(tp, chunks):
    kind, hparams = DenseDelta(), {"delta_scale": 2.0}
    x, w, _, dy = _problem(seed=100 + tp)
    full = _full(kind, hparams, seed=tp)
    y_ref, dx_ref, ref_grads = _dense_grads(kind, hparams, full, x, w, None, dy)
    in_spec = ShardSpec(dim=1, chunks=chunks)
    hosts, partials, dxs = [], [], []
    for rank in range(tp):
        host = _host(RowParallelHost, "row", tp, rank, chunks, False, in_spec.shard(w, rank, tp), None,
                     kind, hparams, full)
        xi = in_spec.shard(x, rank, tp).clone().requires_grad_()
        pi, _ = host(xi)
        pi.backward(dy)  # all-reduce backward is the identity: dy arrives complete
        hosts.append(host); partials.append(pi.detach()); dxs.append(xi.grad)
    torch.testing.assert_close(sum(partials), y_ref, atol=TOL, rtol=0)  # the base's one all-reduce
    torch.testing.assert_close(in_spec.unshard(dxs), dx_ref, atol=TOL, rtol=0)
    _check_tensor_grads(hosts, ref_grads, tp)


def test_replicated_host_local_addend_matches_dense():
    kind, hparams = DenseDelta(), {"delta_scale": 0.25}
    x, w, bias, dy = _problem(seed=3)
    full = _full(kind, hparams)
    y_ref, dx_ref, ref_grads = _dense_grads(kind, hparams, full, x, w, bias, dy)
    host = _host(ReplicatedHost, "replicated", 1, 0, 1, False, w, bias, kind, hparams, full)
    xi = x.clone().requires_grad_()
    y = host(xi)
    y.backward(dy)
    torch.testing.assert_close(y.detach(), y_ref, atol=TOL, rtol=0)
    torch.testing.assert_close(xi.grad, dx_ref, atol=TOL, rtol=0)
    _check_tensor_grads([host], ref_grads, 1)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_merge_per_shard_equals_dense_merge_and_unmerge_is_exact(tp):
    kind, hparams = DenseDelta(), {"delta_scale": 0.5}
    x, w, bias, _ = _problem(seed=11)
    full = _full(kind, hparams)
    w_spec = ShardSpec(dim=0, chunks=2)
    hosts = [_host(ColumnParallelHost, "column", tp, rank, 2, False, w_spec.shard(w, rank, tp),
                   w_spec.shard(bias, rank, tp), kind, hparams, full) for rank in range(tp)]
    with torch.no_grad():
        before = [h(x)[0] for h in hosts]
        originals = [h.weight.clone() for h in hosts]
        for host in hosts:
            host.merge()
            assert host.merged_adapters == ["default"]
        torch.testing.assert_close(w_spec.unshard([h.weight for h in hosts]), w + 0.5 * full["delta"], atol=TOL, rtol=0)
        for host, y in zip(hosts, before):  # merged adapters no longer run: the same output once
            torch.testing.assert_close(host(x)[0], y, atol=TOL, rtol=0)
        for host, original in zip(hosts, originals):
            host.unmerge()
            assert torch.equal(host.weight, original) and host.merged_adapters == []


def test_host_bookkeeping_is_generic_over_declared_tensors():
    kind, hparams = SquaredColumns(), {"k": 3}
    full = _full(kind, hparams)
    host = _host(ColumnParallelHost, "column", 2, 1, 1, False, torch.zeros(OUT_F // 2, IN_F), None, kind, hparams, full)
    assert host.k == {"default": 3} and host.has_adapter("default")
    names = [n for n, _ in host.named_parameters()]
    assert names == ["weight", "proj_p.default.weight", "proj_q.default.weight"]
    q = host.adapter_tensors("default")["proj_q"]
    assert q.tensor_model_parallel and q.partition_dim == 0
    assert not getattr(host.adapter_tensors("default")["proj_p"], "tensor_model_parallel", False)
    state = host.sharded_tensors("default")
    assert list(state) == ["proj.proj_p.default.weight", "proj.proj_q.default.weight"]
    assert state["proj.proj_q.default.weight"].global_shape == (OUT_F, 3)
    assert torch.equal(state["proj.proj_q.default.weight"].local, full["proj_q"][OUT_F // 2:])
    assert "default: k=3" in repr(host)
    with pytest.raises(ValueError, match=r"shards \(2, 16\), \(24, 3\) do not match k=2: expected \(2, 16\), \(24, 2\)"):
        host.replace_tensors("default", {"proj_p": torch.zeros(2, IN_F), "proj_q": torch.zeros(24, 3)}, {"k": 2})
    host.adapter_tensors("default")["proj_p"].requires_grad_(False)
    host.replace_tensors("default", {"proj_p": torch.ones(2, IN_F), "proj_q": torch.ones(24, 2)}, {"k": 2})
    assert host.k == {"default": 2} and not host.adapter_tensors("default")["proj_p"].requires_grad
    host.delete_adapter("default")
    assert not host.has_adapter("default") and host.k == {} and [n for n, _ in host.named_parameters()] == ["weight"]


@pytest.mark.parametrize("cls,mode", [(ColumnParallelHost, "column"), (RowParallelHost, "row"),
                                      (ReplicatedHost, "replicated")])
def test_hosts_refuse_slots_they_do_not_implement(cls, mode):
    host = cls(nn.Linear(IN_F, OUT_F), _geometry(mode, 1, 0), "proj")
    missing = LOCAL_ADDEND if mode == "row" else PARTIAL_ADDEND
    with pytest.raises(NotImplementedError, match=rf"\['{missing}'\], which {cls.__name__} does not implement"):
        host.add_adapter("a", Fills(missing), AdapterSettings({"h": 1}), {})
    if mode != "column":
        with pytest.raises(NotImplementedError, match=INPUT_COLUMNS):
            host.add_adapter("a", Fills(INPUT_COLUMNS), AdapterSettings({"h": 1}), {})
    assert not list(host.children())


def test_a_kind_may_not_shadow_the_hosts_attributes():
    host = ReplicatedHost(nn.Linear(IN_F, OUT_F), _geometry("replicated", 1, 0), "proj")
    full = {"weight": torch.zeros(2, IN_F), "t": torch.zeros(2, IN_F)}
    with pytest.raises(ValueError, match="declares 'weight', which the host uses"):
        host.add_adapter("a", Fills(LOCAL_ADDEND, tensor="weight"), AdapterSettings({"h": 1}), full)
    with pytest.raises(ValueError, match="declares 'geometry', which the host uses"):
        host.add_adapter("b", Fills(LOCAL_ADDEND, hparam="geometry"), AdapterSettings({"geometry": 1}), full)
    with pytest.raises(ValueError, match=r"hyperparameters \['x'\] do not match the declared \['h'\]"):
        host.add_adapter("c", Fills(LOCAL_ADDEND), AdapterSettings({"x": 1}), full)
    assert not list(host.children()) and not host.kinds and isinstance(host.geometry, LinearGeometry)  # untouched


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"q_proj": nn.Linear(IN_F, IN_F), "v_proj": nn.Linear(IN_F, IN_F)})
                                    for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer["v_proj"](torch.relu(layer["q_proj"](x)))
        return x


def test_adapter_model_runs_a_registered_kind_beside_lora(monkeypatch):
    """AdapterModel knows no kind: a toy kind's adapter trains, saves, switches, merges and unloads."""
    from parallel_adapters import LoraConfig

    monkeypatch.setattr(kinds, "_REGISTRY", dict(kinds._REGISTRY))
    kinds.register_kind(DenseDelta())
    torch.manual_seed(0)
    model = get_adapter_model(Tiny().double(), DeltaConfig(delta_scale=0.5), groups=ParallelGroups.single())
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [f"model.layers.{i}.q_proj.delta.default.weight" for i in range(2)]
    state = model.adapter_state_dict()
    assert sorted(state) == [f"layers.{i}.q_proj.delta.default.weight" for i in range(2)]
    assert state["layers.0.q_proj.delta.default.weight"].global_shape == (IN_F, IN_F)
    x = torch.randn(3, IN_F, dtype=torch.float64)
    layer = model.model.layers[0]["q_proj"]
    expected = F.linear(x, layer.weight, layer.bias) + 0.5 * F.linear(x, state["layers.0.q_proj.delta.default.weight"].local)
    torch.testing.assert_close(layer(x), expected, atol=TOL, rtol=0)
    with torch.no_grad():
        out_delta = model(x)
        model.add_adapter("lora", LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        assert set(model.model.layers[0]["q_proj"].kinds) == {"default", "lora"}
        model.set_adapter("lora")
        assert sorted(n for n, p in model.named_parameters() if p.requires_grad)[0].endswith("lora_A.lora.weight")
        assert not torch.allclose(model(x), out_delta)
        model.delete_adapter("lora")
        torch.testing.assert_close(model(x), out_delta, atol=0, rtol=0)
        plain = model.merge_and_unload()
        assert not any(hasattr(m, "kinds") for m in plain.modules())
        torch.testing.assert_close(plain(x), out_delta, atol=TOL, rtol=0)
