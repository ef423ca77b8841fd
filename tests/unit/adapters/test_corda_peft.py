"""CorDA ("ipm", "kpm") at world size 1 on plain nn.Linear layers against Hugging Face PEFT's own
`preprocess_corda` + `init_lora_weights="corda"` (the oracle), float32, on weights with planted
spectra and given calibration data (anisotropic inputs, so C is far from the identity).

Checked: A, B and the residual W - s B A within 1e-5 of PEFT's (relative to each tensor's largest
entry), up to the signs of the pairs: PEFT keeps LAPACK's signs; ours (decompose/corda.py) makes
the largest entry of each right singular vector of W C positive, so each pair (B[:, j], A[j]) is
flipped onto PEFT's before comparing (the residual does not depend on signs).  Also: the output is
unchanged at init, the covariance / cache files are safetensors and reproduce the adapter, and
the config errors.
"""
import copy
import dataclasses
import importlib.util
import sys
import types

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from parallel_adapters import LoraConfig, ParallelGroups, get_adapter_model
from parallel_adapters.config import CordaConfig
from parallel_adapters.eva.corda import initialize_corda_weights

peft = pytest.importorskip("peft")

TOL = 1e-5
R, ALPHA = 3, 6


def planted(out_f, in_f, seed):
    """U diag(S) V^T, S evenly spaced 8 .. 1 (gaps everywhere: top and bottom triplets defined)."""
    g = torch.Generator().manual_seed(seed)
    k = min(out_f, in_f)
    u = torch.linalg.qr(torch.randn(out_f, k, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(in_f, k, generator=g, dtype=torch.float64)).Q
    return (u * torch.linspace(8.0, 1.0, k, dtype=torch.float64)) @ v.T


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 16)
        self.down = nn.Linear(16, 10, bias=False)
        with torch.no_grad():
            self.up.weight.copy_(planted(16, 12, 1))
            self.down.weight.copy_(planted(10, 16, 2))

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def calibration(n=6, seq=20):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, seq, 12, generator=g) * torch.linspace(0.5, 2.0, 12)


def _pair(method, tmp_path=None, **files):
    torch.manual_seed(0)
    base, data = Stack(), calibration()
    kw = dict(r=R, lora_alpha=ALPHA, target_modules=["up", "down"], init_lora_weights="corda")
    theirs_base = copy.deepcopy(base)
    from peft.tuners.lora.config import CordaConfig as PeftCorda
    if "attr" not in sys.modules:  # peft's corda.py takes `dataclass` from attrs, absent here: the stdlib's is the same
        if importlib.util.find_spec("attr") is None:
            sys.modules["attr"] = types.SimpleNamespace(dataclass=dataclasses.dataclass)
    from peft.tuners.lora.corda import preprocess_corda

    peft_config = peft.LoraConfig(**kw, corda_config=PeftCorda(corda_method=method))
    preprocess_corda(theirs_base, peft_config, run_model=lambda: [theirs_base(x[None]) for x in data])
    theirs = peft.get_peft_model(theirs_base, peft_config)
    ours = get_adapter_model(copy.deepcopy(base), LoraConfig(**kw, corda_config=CordaConfig(corda_method=method,
                                                                                            **files)),
                             groups=ParallelGroups.single())
    initialize_corda_weights(ours, [data[:4], data[4:]], show_progress_bar=False)  # batches of 4 and 2
    return base, ours, theirs, data


def _aligned(ours_a, ours_b, peft_a, peft_b):
    signs = torch.sign((ours_a * peft_a).sum(dim=1))
    return ours_a * signs[:, None], ours_b * signs


def _close(got, want, what):
    error = ((got - want).abs().max() / want.abs().max()).item()
    assert error <= TOL, f"{what}: {error}"


def _check(ours, theirs):
    for name in ("up", "down"):
        o, p = getattr(ours.model, name), getattr(theirs.base_model.model, name)
        a, b = o.lora_A["default"].weight.detach(), o.lora_B["default"].weight.detach()
        pa, pb = p.lora_A["default"].weight.detach(), p.lora_B["default"].weight.detach()
        a, b = _aligned(a, b, pa, pb)
        _close(a, pa, f"{name} A")
        _close(b, pb, f"{name} B")
        _close(o.weight.detach(), p.base_layer.weight.detach(), f"{name} residual")


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_factors_and_residual_match_peft(method):
    base, ours, theirs, data = _pair(method)
    _check(ours, theirs)
    with torch.no_grad():  # W_res + s B A = W: the model is unchanged at init
        assert (ours(data) - base(data)).abs().max().item() < 1e-5


def test_files_are_safetensors_and_reproduce_the_adapter(tmp_path):
    files = dict(covariance_file=str(tmp_path / "cov.safetensors"), cache_file=str(tmp_path / "cache.safetensors"))
    _, first, theirs, _ = _pair("ipm", **files)
    assert set(load_file(files["covariance_file"])) == {"up", "down"}
    assert load_file(files["cache_file"])["up.eigens.U_WC"].shape == (16, R)
    for drop in (None, "cache_file"):  # the cache alone, then the covariance alone
        if drop:
            (tmp_path / "cache.safetensors").unlink()
        again = get_adapter_model(Stack(), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["up", "down"],
                                                      init_lora_weights="corda", corda_config=CordaConfig(**files)),
                                  groups=ParallelGroups.single())
        initialize_corda_weights(again, None, show_progress_bar=False)
        for name in ("up", "down"):
            for t in ("lora_A", "lora_B"):
                got, want = getattr(getattr(again.model, name), t)["default"].weight, \
                    getattr(getattr(first.model, name), t)["default"].weight
                assert torch.allclose(got, want, atol=1e-6), (drop, name, t)


def test_config_errors():
    with pytest.raises(ValueError, match="corda_method"):
        CordaConfig(corda_method="xpm")
    assert LoraConfig(init_lora_weights="corda").corda_config == CordaConfig()
    ours = get_adapter_model(Stack(), LoraConfig(r=R, target_modules=["up"], init_lora_weights="corda"),
                             groups=ParallelGroups.single())
    with pytest.raises(ValueError, match="dataloader"):
        initialize_corda_weights(ours, None)


@pytest.mark.parametrize("half", [True, False])
def test_covariance_dtype_and_kept_fields_match_peft(half):
    """use_float16_for_covariance on a bfloat16 model (C accumulated in the input's dtype, else
    float32) and prune_temporary_fields=False (C kept on the layer): PEFT's covariance, its dtype."""
    from peft.tuners.lora.config import CordaConfig as PeftCorda

    _pair("ipm")  # installs the attrs shim PEFT's corda.py needs
    from peft.tuners.lora.corda import preprocess_corda

    torch.manual_seed(0)
    base, data = Stack().to(torch.bfloat16), calibration().to(torch.bfloat16)
    kw = dict(r=R, lora_alpha=ALPHA, target_modules=["up", "down"], init_lora_weights="corda")
    options = dict(use_float16_for_covariance=half, prune_temporary_fields=False)
    theirs = copy.deepcopy(base)
    preprocess_corda(theirs, peft.LoraConfig(**kw, corda_config=PeftCorda(**options)),
                     run_model=lambda: [theirs(x[None]) for x in data])
    ours = get_adapter_model(copy.deepcopy(base), LoraConfig(**kw, corda_config=CordaConfig(**options)),
                             groups=ParallelGroups.single())
    initialize_corda_weights(ours, [data[:4], data[4:]], show_progress_bar=False)
    for name in ("up", "down"):
        got, want = getattr(ours.model, name).__dict__["corda_covariance"], getattr(theirs, name).covariance_matrix
        assert got.dtype == want.dtype == (torch.bfloat16 if half else torch.float32), (name, got.dtype, want.dtype)
        tol = 0.03 if half else TOL  # bfloat16 sums in another order
        assert ((got.float() - want.float()).abs().max() / want.float().abs().max()).item() <= tol, name
