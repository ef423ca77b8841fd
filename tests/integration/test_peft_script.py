"""A script written for PEFT runs on parallel_adapters with only its import line changed, and gives
PEFT's numbers.

Oracle: PEFT 0.21.2 itself.  `SCRIPT` (LoRA + EVA on a float32 MLP of nn.Linear layers taking
tensor batches: get_peft_model, get_eva_state_dict, initialize_lora_eva_weights, three AdamW
steps, save_pretrained / PeftModel.from_pretrained, merge_and_unload) runs twice, each time in a
fresh `python -c` process (no torch.distributed, no Megatron parallel state: the path a PEFT user
is on), once under PEFT's import line and once under ours, on the same seeds and data.  Every
number must agree within 1e-6: EVA components, ranks and alphas, losses, reloaded outputs, merged
weights.  Each side's saved adapter must also load into the other library with the same outputs.

Precision: EVA components of float32 inputs agree to a few 1e-7 here (PEFT's first incremental
step is a float32 SVD, ours a float64 Gram of float32 products); with near-equal singular values
both drift further from the exact float64 answer, so the data have well separated ones.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

PEFT_IMPORTS = ("from peft import EvaConfig, LoraConfig, PeftModel, get_eva_state_dict, get_peft_model, "
                "initialize_lora_eva_weights")
OUR_IMPORTS = ("from parallel_adapters import AdapterModel as PeftModel, EvaConfig, LoraConfig, get_eva_state_dict, "
               "get_adapter_model as get_peft_model, initialize_eva_weights as initialize_lora_eva_weights")
TOL = 1e-6

MODEL = '''
import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def base_model():
    torch.manual_seed(0)
    return MLP()
'''

SCRIPT = '''
{imports}
import json, sys
from safetensors.torch import save_file
{model}
out_dir = sys.argv[1]
assert not torch.distributed.is_initialized()

g = torch.Generator().manual_seed(7)
mixing = torch.linalg.qr(torch.randn(8, 8, generator=g)).Q
scales = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.12, 0.06])
data = [(torch.randn(64, 8, generator=g) * scales) @ mixing for _ in range(24)]
teacher = torch.randn(4, 8, generator=g)
targets = [torch.tanh(x @ teacher.T) for x in data]
probe = torch.randn(5, 8, generator=g)

config = LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2", "head"], init_lora_weights="eva",
                    eva_config=EvaConfig(rho=2.0, tau=0.99))
model = get_peft_model(base_model(), config)
eva = get_eva_state_dict(model, data, forward_fn=lambda m, x: m(x), prepare_model_inputs_fn=None,
                         prepare_layer_inputs_fn=None, show_progress_bar=False)
tensors = {{"eva/" + k: v.detach().double().contiguous() for k, v in eva.items()}}
tensors["probe"] = probe
initialize_lora_eva_weights(model, eva_state_dict=dict(eva))
cfg = model.peft_config["default"]
numbers = {{"rank_pattern": dict(cfg.rank_pattern), "alpha_pattern": dict(cfg.alpha_pattern)}}

optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
losses = []
for x, y in zip(data[:3], targets[:3]):
    loss = nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
numbers["losses"] = losses

with torch.no_grad():
    tensors["trained_output"] = model(probe)
model.save_pretrained(out_dir + "/adapter")
reloaded = PeftModel.from_pretrained(base_model(), out_dir + "/adapter")
with torch.no_grad():
    tensors["reloaded_output"] = reloaded(probe)
merged = model.merge_and_unload()
tensors.update({{"merged/" + k: v.detach().clone() for k, v in merged.state_dict().items()}})
with torch.no_grad():
    tensors["merged_output"] = merged(probe)
save_file(tensors, out_dir + "/tensors.safetensors")
with open(out_dir + "/numbers.json", "w") as f:
    json.dump(numbers, f)
'''


def _run(imports: str, out_dir: Path) -> tuple[dict, dict]:
    out_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "PYTHONWARNINGS": "ignore"}
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(imports=imports, model=MODEL), str(out_dir)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return load_file(str(out_dir / "tensors.safetensors")), json.loads((out_dir / "numbers.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft_script")
    return {"peft": (root / "peft", *_run(PEFT_IMPORTS, root / "peft")),
            "ours": (root / "ours", *_run(OUR_IMPORTS, root / "ours"))}


def test_only_the_import_line_differs():
    peft_script, ours = (SCRIPT.format(imports=i, model=MODEL) for i in (PEFT_IMPORTS, OUR_IMPORTS))
    assert peft_script.replace(PEFT_IMPORTS, OUR_IMPORTS) == ours and peft_script != ours


def test_eva_components_ranks_and_alphas_equal_peft(runs):
    (_, peft_t, peft_n), (_, our_t, our_n) = runs["peft"], runs["ours"]
    eva = sorted(k for k in peft_t if k.startswith("eva/"))
    assert eva == sorted(k for k in our_t if k.startswith("eva/"))
    assert eva == ["eva/base_model.model.fc1", "eva/base_model.model.fc2", "eva/base_model.model.head"]
    for key in eva:
        assert peft_t[key].shape == our_t[key].shape, key
        torch.testing.assert_close(our_t[key], peft_t[key], atol=TOL, rtol=0, msg=key)
    assert peft_n["rank_pattern"], "the data should redistribute the ranks"
    assert our_n["rank_pattern"] == peft_n["rank_pattern"]
    assert our_n["alpha_pattern"] == pytest.approx(peft_n["alpha_pattern"], abs=TOL)


def test_losses_outputs_and_merged_weights_equal_peft(runs):
    (_, peft_t, peft_n), (_, our_t, our_n) = runs["peft"], runs["ours"]
    assert our_n["losses"] == pytest.approx(peft_n["losses"], abs=TOL, rel=0)
    assert peft_n["losses"][-1] < peft_n["losses"][0]
    rest = sorted(k for k in peft_t if not k.startswith("eva/"))
    assert rest == sorted(k for k in our_t if not k.startswith("eva/"))
    assert "merged/fc1.weight" in rest and "reloaded_output" in rest
    for key in rest:
        torch.testing.assert_close(our_t[key], peft_t[key], atol=TOL, rtol=0, msg=key)
    torch.testing.assert_close(our_t["reloaded_output"], our_t["trained_output"], atol=0, rtol=0)


def test_saved_adapters_load_across_libraries(runs):
    """PEFT's from_pretrained reads our directory and ours reads PEFT's: the same outputs."""
    import peft

    from parallel_adapters import AdapterModel

    ns: dict = {}
    exec(MODEL, ns)
    probe, expected = runs["peft"][1]["probe"], runs["peft"][1]["reloaded_output"]
    ours_in_peft = peft.PeftModel.from_pretrained(ns["base_model"](), str(runs["ours"][0] / "adapter"))
    peft_in_ours = AdapterModel.from_pretrained(ns["base_model"](), runs["peft"][0] / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(ours_in_peft(probe), expected, atol=TOL, rtol=0)
        torch.testing.assert_close(peft_in_ours(probe), expected, atol=0, rtol=0)
