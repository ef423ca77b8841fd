"""EVA at world size 1 against PEFT 0.21.2's own EVA (the oracle), on the same module and batches.

The module (tests/distributed/eva_jobs.Block) is plain nn.Linear layers in a Hugging Face style
block: q/k/v receive one tensor object, gate/up another, so PEFT's hash-based sharing and ours
(structural) must find the same groups.  Every layer input has a clear spectral gap.
"""
from __future__ import annotations

import copy

import peft
import pytest
import torch

from parallel_adapters import ParallelGroups, get_adapter_model
from parallel_adapters.eva.initialize import get_eva_layer_states, get_eva_state_dict, initialize_eva_weights
from parallel_adapters.eva.statistics import subspace_similarity
from tests.distributed.eva_jobs import TARGETS, Block, gap_table, lora_config, token_batches

pytestmark = pytest.mark.filterwarnings("ignore:lora with eva initialization used with low_cpu_mem_usage")
BATCHES = token_batches(12, batch=4, seq=32, labels=True)


def _counting_forward(counter: list):
    def forward(model, batch):
        counter.append(1)
        return model(**{k: v for k, v in batch.items() if k != "labels"})
    return forward


def run_ours(base, config, batches=BATCHES):
    model = get_adapter_model(copy.deepcopy(base), config, groups=ParallelGroups.single())
    steps: list = []
    state = get_eva_layer_states(model, batches, forward_fn=_counting_forward(steps), show_progress_bar=False)
    return model, state, len(steps)


def run_peft(base, config, batches=BATCHES):
    eva = config.eva_config
    pconfig = peft.LoraConfig(
        r=config.r, lora_alpha=config.lora_alpha, target_modules=list(config.target_modules),
        init_lora_weights="eva",
        eva_config=peft.EvaConfig(rho=eva.rho, tau=eva.tau, whiten=eva.whiten,
                                  adjust_scaling_factors=eva.adjust_scaling_factors))
    model = peft.get_peft_model(copy.deepcopy(base), pconfig)
    steps: list = []
    state = peft.get_eva_state_dict(model, batches, forward_fn=_counting_forward(steps), show_progress_bar=False)
    return model, {k.replace("base_model.model.", ""): v for k, v in state.items()}, len(steps)


@pytest.fixture(scope="module")
def base():
    return Block()


@pytest.fixture(scope="module")
def both(base):
    config = lora_config()
    return run_ours(base, config), run_peft(base, config)


def test_same_ranks_and_components_as_peft(both):
    (_, ours, our_steps), (_, theirs, peft_steps) = both
    assert set(ours) == set(theirs) == set(TARGETS)
    ranks = {n: s.rank for n, s in ours.items()}
    assert ranks == {n: int(t.shape[0]) for n, t in theirs.items()}
    assert len(set(ranks.values())) > 1, f"the data should redistribute ranks: {ranks}"
    assert sum(ranks.values()) == 4 * len(TARGETS)  # the budget is used in full
    for name, s in ours.items():
        assert s.converged
        sim = subspace_similarity(theirs[name].double(), s.components)
        assert sim >= 0.99, (name, sim)
    print(f"EVA steps: ours {our_steps}, PEFT {peft_steps}; ranks {ranks}")
    assert abs(our_steps - peft_steps) <= 1


def test_shared_inputs_share_one_decomposition(both):
    (_, ours, _), _ = both
    for a, b in (("q_proj", "k_proj"), ("k_proj", "v_proj"), ("gate_proj", "up_proj")):
        k = min(ours[a].rank, ours[b].rank)  # members of a group may get fewer ranks than the owner
        assert k > 0 and torch.equal(ours[a].components[:k], ours[b].components[:k])
    assert not torch.equal(ours["q_proj"].components[:1], ours["o_proj"].components[:1])


def test_default_forward_stops_once_every_layer_is_captured(base):
    """forward_fn=None: each step's forward ends in the pre-hook of its last unconverged layer
    (down_proj here), and the state is the same as with the whole forward (a custom forward_fn)."""
    config = lora_config()
    _, whole, whole_steps = run_ours(base, config)
    model = get_adapter_model(copy.deepcopy(base), config, groups=ParallelGroups.single())
    down = dict((l.module_name, l) for _, l in model.adapter_layers())["down_proj"]
    ran = []
    down.register_forward_hook(lambda *args: ran.append(1))
    state = get_eva_layer_states(model, BATCHES, show_progress_bar=False)
    assert whole_steps > 2 and len(ran) == 1  # the probe's forward only
    for name, s in state.items():
        assert s.rank == whole[name].rank and torch.equal(s.components, whole[name].components), name


def test_initialize_matches_peft_patterns_and_keeps_base_output(base):
    config = lora_config()
    ours, state, _ = run_ours(base, config)
    theirs, _, _ = run_peft(base, config)
    x = BATCHES[0]["input_ids"]
    with torch.no_grad():
        before = ours(x)
    initialize_eva_weights(ours, eva_state_dict=state)
    peft.initialize_lora_eva_weights(theirs, BATCHES, show_progress_bar=False)
    ours_cfg, peft_cfg = ours.peft_config["default"], theirs.peft_config["default"]
    assert ours_cfg.rank_pattern == peft_cfg.rank_pattern
    assert ours_cfg.alpha_pattern == pytest.approx(peft_cfg.alpha_pattern)
    assert ours_cfg.init_lora_weights == "eva"
    for _, layer in ours.adapter_layers():
        s = state[layer.module_name]
        assert layer.r["default"] == s.rank and layer.lora_alpha["default"] == s.alpha
        assert torch.equal(layer.lora_A["default"].weight, s.components.float())
        assert not layer.lora_B["default"].weight.any()
        assert layer.lora_A["default"].weight.requires_grad
    with torch.no_grad():
        assert torch.equal(ours(x), before)  # B = 0: the adapted model is the base model


def test_whiten_and_unadjusted_alpha_match_peft(base):
    config = lora_config(whiten=True, adjust_scaling_factors=False)
    (_, ours, _), (_, theirs, _) = run_ours(base, config), run_peft(base, config)
    for name, s in ours.items():
        assert s.alpha == 8
        torch.testing.assert_close(s.components.norm(dim=1) ** -2, s.singular_values)  # rows / sqrt(S)
        if name not in ("o_proj", "down_proj"):
            # PEFT whitens a view of the shared hook's components in place once per member of a
            # shared-input group (q/k/v: three times), so only unshared layers are comparable.
            continue
        ref = theirs[name].double()
        assert s.components.shape == ref.shape
        torch.testing.assert_close(s.components.norm(dim=1), ref.norm(dim=1), rtol=2e-2, atol=0)
        assert subspace_similarity(ref, s.components) >= 0.99


class _TwoLayers(torch.nn.Module):
    """`a` sees a flat rank-8 spectrum, `b` isotropic data in 64 dims: b's ratios all lose."""

    def __init__(self):
        super().__init__()
        self.ea, self.eb = torch.nn.Embedding(512, 32), torch.nn.Embedding(512, 64)
        table = gap_table(7, 0.9, rows=512, rank=8)
        self.ea.weight.data.copy_(table)
        self.eb.weight.data.copy_(torch.randn(512, 64, generator=torch.Generator().manual_seed(3)))
        self.a, self.b = torch.nn.Linear(32, 16), torch.nn.Linear(64, 16)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.a(self.ea(input_ids)) + self.b(self.eb(input_ids))


def test_rank_zero_layer_loses_its_adapter_as_in_peft():
    base = _TwoLayers()
    config = lora_config(("a", "b"))
    batches = token_batches(10, batch=8, seq=32, vocab=512, seed=11)
    ours, state, _ = run_ours(base, config, batches)
    theirs, peft_state, _ = run_peft(base, config, batches)
    assert {n: s.rank for n, s in state.items()} == {"a": 8, "b": 0}
    assert {n: int(t.shape[0]) for n, t in peft_state.items()} == {"a": 8, "b": 0}
    initialize_eva_weights(ours, eva_state_dict=state)
    peft.initialize_lora_eva_weights(theirs, batches, show_progress_bar=False)
    assert [layer.module_name for _, layer in ours.adapter_layers() if layer.lora_A] == ["a"]
    cfg = ours.peft_config["default"]
    assert cfg.target_modules == ("a",) and cfg.rank_pattern == {"a": 8} and cfg.alpha_pattern == {"a": 16.0}
    assert cfg.rank_pattern == theirs.peft_config["default"].rank_pattern


def test_state_saves_and_loads_with_a_rank_zero_layer(tmp_path):
    from parallel_adapters.eva.persist import load_eva_state, save_eva_state

    config = lora_config(("a", "b"))
    batches = token_batches(10, batch=8, seq=32, vocab=512, seed=11)
    model, state, _ = run_ours(_TwoLayers(), config, batches)
    save_eva_state(tmp_path / "eva", state, ParallelGroups.single(), config.to_dict())
    loaded = load_eva_state(tmp_path / "eva", ParallelGroups.single())
    assert {n: (s.rank, s.alpha, s.converged) for n, s in loaded.items()} == \
        {n: (s.rank, s.alpha, s.converged) for n, s in state.items()}
    assert torch.equal(loaded["a"].components, state["a"].components) and loaded["b"].components.shape == (0, 64)
    initialize_eva_weights(model, eva_state_dict=loaded)
    assert [layer.module_name for _, layer in model.adapter_layers() if layer.lora_A] == ["a"]


def test_peft_style_tensor_state_dict(base):
    """A plain {name: full components} dict (PEFT's format) initialises the same way."""
    config = lora_config()
    ours, state, _ = run_ours(base, config)
    initialize_eva_weights(ours, eva_state_dict={n: s.components for n, s in state.items()})
    for _, layer in ours.adapter_layers():
        s = state[layer.module_name]
        assert layer.r["default"] == s.rank and layer.lora_alpha["default"] == pytest.approx(s.alpha)


def test_errors_are_clear(base):
    from parallel_adapters import LoraConfig

    model = get_adapter_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=list(TARGETS)),
                              groups=ParallelGroups.single())
    with pytest.raises(ValueError, match="init_lora_weights='eva'"):
        initialize_eva_weights(model, BATCHES)
    eva_model = get_adapter_model(copy.deepcopy(base), lora_config(), groups=ParallelGroups.single())
    with pytest.raises(ValueError, match="dataloader is empty"):
        get_eva_state_dict(eva_model, [], show_progress_bar=False)
    with pytest.raises(ValueError, match="dataloader or an eva_state_dict"):
        initialize_eva_weights(eva_model)
    with pytest.raises(ValueError, match="AdapterModel"):
        get_eva_state_dict(base, BATCHES)


def test_step_cap_warns_naming_the_layer():
    model = get_adapter_model(Block(extra_noise_layer=True), lora_config(TARGETS + ("noise_proj",), max_steps=5),
                              groups=ParallelGroups.single())
    with pytest.warns(UserWarning, match=r"max_steps=5.*noise_proj"):
        state = get_eva_layer_states(model, BATCHES, show_progress_bar=False)
    assert not state["noise_proj"].converged and state["noise_proj"].rank > 0
    assert state["q_proj"].converged


# ----------------------------------------------------------------------------------------------
# End to end: LoRA from EVA learns a low-rank target faster than the default init
# ----------------------------------------------------------------------------------------------

class _Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(256, 32)
        self.emb.weight.data.copy_(gap_table(21, 0.6))
        self.proj = torch.nn.Linear(32, 32)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.proj(self.emb(input_ids))


def lora_training_curve(init: str, steps: int = 20, lr: float = 1e-2, seed: int = 0) -> list[float]:
    """MSE to base(x) + x dW^T (dW fixed, random) over `steps` AdamW steps; LoRA r=4 on proj."""
    from parallel_adapters import LoraConfig

    torch.manual_seed(seed)
    base = _Regression()
    delta = 0.3 * torch.randn(32, 32, generator=torch.Generator().manual_seed(99))
    data = token_batches(steps, batch=8, seq=32, seed=123, pad=0.0)
    with torch.no_grad():
        targets = [base(b["input_ids"]) + base.emb(b["input_ids"]) @ delta.T for b in data]
    config = (lora_config(("proj",), r=4, alpha=8, rho=1.0) if init == "eva"
              else LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], seed=seed))
    model = get_adapter_model(base, config, groups=ParallelGroups.single())
    if init == "eva":
        initialize_eva_weights(model, data[:8], show_progress_bar=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for batch, target in zip(data, targets):
        loss = torch.nn.functional.mse_loss(model(batch["input_ids"]), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_eva_init_trains_faster_than_default():
    eva, default = lora_training_curve("eva"), lora_training_curve("default")
    print("EVA    ", [round(v, 4) for v in eva])
    print("default", [round(v, 4) for v in default])
    assert eva[0] == pytest.approx(default[0])  # B = 0 in both: same starting loss
    assert eva[-1] < 0.8 * default[-1]
