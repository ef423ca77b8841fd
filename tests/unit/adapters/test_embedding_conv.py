"""LoRA on a plain nn.Embedding and nn.Conv2d, one process, against PEFT itself: the same factor
values give PEFT's outputs, gradients and merged weights (float32, 1e-6), and a dense float64
recomputation of the delta."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from parallel_adapters import LoraConfig, ParallelGroups, get_adapter_model
from parallel_adapters.adapters.hosts.embedding import Conv2dHost, EmbeddingHost

peft = pytest.importorskip("peft")

SINGLE = ParallelGroups.single()
TARGETS = ["emb", "conv", "conv1x1", "head"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.conv = nn.Conv2d(3, 4, kernel_size=3, stride=2, padding=1)
        self.conv1x1 = nn.Conv2d(4, 6, kernel_size=1)
        self.head = nn.Linear(6, 5)

    def forward(self, ids, image):
        tokens = self.emb(ids)                                    # [B, T, 6]
        pixels = self.conv1x1(torch.relu(self.conv(image)))       # [B, 6, h, w]
        return self.head(tokens.mean(1) + pixels.mean((2, 3)))


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 11, (2, 7), generator=g), torch.randn(2, 3, 9, 9, generator=g)


def _pair(**config):
    torch.manual_seed(0)
    base = Net()
    ours = get_adapter_model(_clone(base), LoraConfig(r=2, lora_alpha=3, target_modules=TARGETS,
                                                      init_lora_weights=False, **config), groups=SINGLE)
    theirs = peft.get_peft_model(_clone(base), peft.LoraConfig(r=2, lora_alpha=3, target_modules=TARGETS,
                                                               init_lora_weights=False, **config))
    theirs_params = dict(theirs.named_parameters())
    with torch.no_grad():  # PEFT takes our factor values
        for name, param in ours.named_parameters():
            if param.requires_grad:
                theirs_params[_peft_name(name)].copy_(param)
    return ours, theirs


def _clone(model):
    clone = Net()
    clone.load_state_dict(model.state_dict())
    return clone


def _peft_name(ours: str) -> str:
    """`emb.lora_embedding_A.default.weight` -> PEFT's `base_model.model.emb.lora_embedding_A.default`."""
    name = "base_model.model." + ours.removeprefix("model.")
    return name.removesuffix(".weight") if ".lora_embedding_" in name else name


def test_hosts_and_all_linear():
    ours, _ = _pair()
    assert isinstance(ours.model.emb, EmbeddingHost) and isinstance(ours.model.conv, Conv2dHost)
    adapted = get_adapter_model(Net(), LoraConfig(r=2, target_modules="all-linear"), groups=SINGLE)
    hosts = {n for n, m in adapted.model.named_modules() if hasattr(m, "kinds")}
    assert hosts == {"head"}, "all-linear takes linear layers only (PEFT too, here: 'head' is no lm_head)"


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_outputs_and_gradients_match_peft(dropout):
    ours, theirs = _pair(lora_dropout=dropout)
    ids, image = _inputs()
    if dropout:  # PEFT drops the conv input with torch's RNG; compare in eval (no dropout) ...
        ours.eval(), theirs.eval()
    y_ours, y_theirs = ours(ids, image), theirs(ids, image)
    torch.testing.assert_close(y_ours, y_theirs, atol=1e-6, rtol=0)
    (y_ours ** 2).sum().backward()
    (y_theirs ** 2).sum().backward()
    theirs_params = dict(theirs.named_parameters())
    grads = 0
    for name, param in ours.named_parameters():
        if param.requires_grad:
            grads += 1
            torch.testing.assert_close(param.grad, theirs_params[_peft_name(name)].grad, atol=1e-6, rtol=0)
    assert grads == 2 * len(TARGETS)


def test_training_dropout_on_conv_input_only():
    """... and in training the conv adapter's input is dropped (embeddings never: PEFT drops no ids)."""
    ours, _ = _pair(lora_dropout=0.5)
    ids, image = _inputs()
    ours.train()
    emb = ours.model.emb
    assert emb.view("default").dropout is None
    y = emb(ids)
    ours.eval()
    torch.testing.assert_close(y, emb(ids), atol=0, rtol=0)
    conv = ours.model.conv
    ours.train()
    assert not torch.equal(conv(image), conv(image)), "conv adapter input is dropped in training"


def test_merge_matches_peft_and_dense_delta():
    ours, theirs = _pair()
    ids, image = _inputs()
    before = ours(ids, image)
    a = ours.model.conv.lora_A["default"].weight.detach().double()
    b = ours.model.conv.lora_B["default"].weight.detach().double()
    w = ours.model.conv.weight.detach().double().clone()
    merged_ours, merged_theirs = ours.merge_and_unload(), theirs.merge_and_unload()
    for name in ("emb.weight", "conv.weight", "conv1x1.weight", "head.weight"):
        torch.testing.assert_close(merged_ours.state_dict()[name], merged_theirs.state_dict()[name], atol=1e-6, rtol=0)
    # the conv delta is the kernel of "conv A, then 1x1 conv B": check on an input, in float64
    x = torch.randn(1, 3, 9, 9, dtype=torch.float64)
    dense = F.conv2d(x, w, None, 2, 1) + 1.5 * F.conv2d(F.conv2d(x, a, None, 2, 1), b)
    torch.testing.assert_close(F.conv2d(x, merged_ours.conv.weight.double(), None, 2, 1), dense, atol=1e-6, rtol=0)
    torch.testing.assert_close(merged_ours(ids, image), before, atol=1e-5, rtol=0)


def test_state_dict_keys_are_peft_keys():
    ours, theirs = _pair()
    ours_keys = {_peft_name(k.removesuffix(".default.weight") + ".weight").removeprefix("base_model.model.")
                 for k, p in ours.named_parameters() if p.requires_grad}
    peft_keys = {k.removeprefix("base_model.model.") for k in peft.get_peft_model_state_dict(theirs)}
    assert ours_keys == peft_keys


def test_refused_layers_are_named():
    model = Net()
    model.conv = nn.Conv2d(3, 4, 3, groups=1, dilation=2)
    with pytest.raises(ValueError, match="dilation"):
        get_adapter_model(model, LoraConfig(r=2, target_modules=["conv"]), groups=SINGLE)
    model = Net()
    model.conv = nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="conv.*groups=2"):
        get_adapter_model(model, LoraConfig(r=2, target_modules=["conv"]), groups=SINGLE)


class _EmbedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.proj = nn.Linear(6, 6)

    def forward(self, input_ids):
        return self.proj(self.emb(input_ids))


def test_eva_initialises_linear_layers_and_leaves_tables_as_peft_does():
    """PEFT's EVA skips embeddings (UNSUPPORTED_LORA_MODULES): their adapter keeps its default init."""
    from parallel_adapters import initialize_eva_weights

    torch.manual_seed(0)
    model = get_adapter_model(_EmbedMLP(), LoraConfig(r=2, target_modules=["emb", "proj"], init_lora_weights="eva"),
                              groups=SINGLE)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    batches = [{"input_ids": torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(i))}
               for i in range(6)]
    initialize_eva_weights(model, batches, prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None,
                           show_progress_bar=False)
    after = dict(model.named_parameters())
    assert not torch.equal(after["model.proj.lora_A.default.weight"], before["model.proj.lora_A.default.weight"])
    for name in ("model.emb.lora_embedding_A.default.weight", "model.emb.lora_embedding_B.default.weight"):
        assert torch.equal(after[name], before[name]), name


def test_dora_on_embedding_and_linear_matches_peft():
    """DoRA (use_dora=True) on nn.Embedding: PEFT's DoraEmbeddingLayer, one magnitude per width
    column, the norm taken down the table's columns; outputs, gradients and merged weights."""
    torch.manual_seed(0)
    base = Net()
    fields = dict(r=2, lora_alpha=3, target_modules=["emb", "head"], init_lora_weights=False, use_dora=True)
    ours = get_adapter_model(_clone(base), LoraConfig(**fields), groups=SINGLE)
    theirs = peft.get_peft_model(_clone(base), peft.LoraConfig(**fields))
    theirs_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "lora_magnitude_vector" in name:
                param.add_(0.3 * torch.cos(7 * param))  # off its initial norms, so the scale matters
        initial = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
        for name, param in ours.named_parameters():
            if param.requires_grad:
                theirs_params[_peft_name(name)].copy_(param)
    assert initial["model.emb.lora_magnitude_vector.default.weight"].shape == (6,)
    ids, image = _inputs()
    y_ours, y_theirs = ours(ids, image), theirs(ids, image)
    torch.testing.assert_close(y_ours, y_theirs, atol=1e-6, rtol=0)
    (y_ours ** 2).sum().backward()
    (y_theirs ** 2).sum().backward()
    for name, param in ours.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, theirs_params[_peft_name(name)].grad, atol=1e-6, rtol=0, msg=name)
    merged_ours, merged_theirs = ours.merge_and_unload(), theirs.merge_and_unload()
    for name in ("emb.weight", "head.weight"):
        torch.testing.assert_close(merged_ours.state_dict()[name], merged_theirs.state_dict()[name], atol=1e-6, rtol=0)
