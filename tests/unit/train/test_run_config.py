"""Bad run configs fail before anything is built, with the dotted key's name; no process group.

Reference: the field names of train/run_config.py; the layout rule TP x PP x DP == world size.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from parallel_adapters.train.engine import deepspeed_config, load_deepspeed_json
from parallel_adapters.train.run_config import load_run_config
from parallel_adapters.train.validate import check_parallel_layout, validate_run_config

REPO = Path(__file__).resolve().parents[3]
CONFIGS = REPO / "configs"


def _config(*overrides):
    return load_run_config(None, list(overrides))


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"optim\.learning_rate"):
        _config("optim.learning_rate=0.1")
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 0.1\ntrainer:\n  steps: 3\n")
    with pytest.raises(ValueError, match="trainer"):
        load_run_config(path)


@pytest.mark.parametrize("override,key", [
    ("optim.lr=fast", "optim.lr"), ("parallel.tensor=two", "parallel.tensor"),
    ("parallel.sequence_parallel=maybe", "parallel.sequence_parallel"), ("data.paths=corpus.txt", "data.paths"),
])
def test_bad_type_is_named(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        _config(override)


@pytest.mark.parametrize("override,key", [
    ("optim.schedule=exponential", "optim.schedule"), ("optim.lr=0", "optim.lr"), ("optim.steps=0", "optim.steps"),
    ("optim.warmup_steps=100", "optim.warmup_steps"), ("optim.micro_batch=0", "optim.micro_batch"),
    ("optim.grad_clip=-1", "optim.grad_clip"), ("optim.global_batch=0", "optim.global_batch"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last"), ("data.tokenizer=sentencepiece", "data.tokenizer"),
    ("data.seq_len=4096", "data.seq_len"), ("model.vocab_size=100", "model.vocab_size"),
    ("export.peft_dir=out", "export.peft_dir"), ("checkpoint.save_every=5", "checkpoint.save_every"),
    ("deepspeed=/no/such/zero.json", "deepspeed"), ("model.hf_checkpoint=/no/such/model", "model.hf_checkpoint"),
    ("model.dtype=float64", "model.dtype"), ("model.recompute=sometimes", "model.recompute"),
    ("model.attention_dropout=1.0", "model.attention_dropout"), ("model.hidden_dropout=-0.1", "model.hidden_dropout"),
])
def test_bad_value_is_named(override, key):
    config = _config(override)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        validate_run_config(config)


def test_float16_base_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"model\.dtype .*\(float16 needs loss scaling"):
        validate_run_config(_config("model.dtype=float16"))


def test_missing_data_path_is_named(tmp_path):
    good = tmp_path / "a.txt"
    good.write_text("hello")
    config = _config(f"data.paths=[{good}, {tmp_path / 'missing.jsonl'}]")
    with pytest.raises(ValueError, match=r"data\.paths\[1\].*missing\.jsonl"):
        validate_run_config(config)


@pytest.mark.parametrize("world,overrides,message", [
    (4, ["parallel.tensor=3"], r"parallel\.tensor=3 x parallel\.pipeline=1 = 3 does not divide the world size 4"),
    (6, ["parallel.tensor=2", "parallel.pipeline=2"], r"parallel\.tensor=2 x parallel\.pipeline=2 = 4 does not divide"),
    (8, ["parallel.tensor=2", "parallel.data=3"], r"parallel\.data=3"),
    (4, ["parallel.pipeline=4", "model.num_layers=2"], r"model\.num_layers=2 does not divide by parallel\.pipeline=4"),
    (8, ["parallel.tensor=8"], r"model\.num_attention_heads=4 does not divide by parallel\.tensor=8"),
    (4, ["optim.global_batch=6", "optim.micro_batch=2"], r"optim\.global_batch=6"),
    (4, ["parallel.pipeline=2", f"deepspeed={CONFIGS / 'deepspeed' / 'zero1.json'}"], r"parallel\.pipeline=2"),
])
def test_impossible_layout_is_named(world, overrides, message):
    with pytest.raises(ValueError, match=message):
        check_parallel_layout(world, _config(*overrides))


def test_layout_splits_the_global_batch():
    layout = check_parallel_layout(8, _config("parallel.tensor=2", "parallel.pipeline=2", "optim.micro_batch=2",
                                              "optim.global_batch=12"))
    assert (layout.tensor, layout.pipeline, layout.data, layout.accumulation) == (2, 2, 2, 3)
    assert layout.global_batch == 12
    assert check_parallel_layout(2, _config()).accumulation == 1  # default: micro_batch x DP


def test_shipped_configs_load_and_fit_their_layouts():
    tiny = load_run_config(CONFIGS / "tiny.yaml")
    validate_run_config(tiny)
    assert check_parallel_layout(2, tiny).tensor == 2
    assert check_parallel_layout(8, load_run_config(CONFIGS / "llama3_8b_tp8.yaml")).data == 1
    layout = check_parallel_layout(64, load_run_config(CONFIGS / "llama3_70b_tp8_pp4.yaml"))
    assert (layout.tensor, layout.pipeline, layout.data, layout.accumulation) == (8, 4, 2, 64)
    for stage in (1, 2, 3):
        data = load_deepspeed_json(CONFIGS / "deepspeed" / f"zero{stage}.json")
        assert data["zero_optimization"]["stage"] == stage


def test_deepspeed_json_owned_values(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": "auto"}))
    filled = deepspeed_config(load_deepspeed_json(path), micro_batch=4, dp_size=2, grad_clip=1.0, path=str(path))
    owned = ("train_batch_size", "gradient_accumulation_steps", "gradient_clipping")
    assert tuple(filled[k] for k in owned) == (8, 1, 1.0)
    with pytest.raises(ValueError, match="gradient_clipping"):
        deepspeed_config({"gradient_clipping": 5.0}, 4, 2, 1.0, str(path))
    path.write_text(json.dumps({"optimizer": {"type": "AdamW"}}))
    with pytest.raises(ValueError, match="'optimizer'"):
        load_deepspeed_json(path)
    path.write_text(json.dumps({"zero_optimization": {"stage": 4}}))
    with pytest.raises(ValueError, match="zero_optimization.stage"):
        load_deepspeed_json(path)


def test_validation_imports_neither_megatron_nor_deepspeed():
    code = ("import sys; from parallel_adapters.train.run_config import load_run_config; "
            "from parallel_adapters.train.validate import check_parallel_layout, validate_run_config; "
            "c = load_run_config('configs/tiny.yaml'); validate_run_config(c); check_parallel_layout(2, c); "
            "print(sorted(m for m in ('megatron', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_weight_rewriting_inits_are_accepted_but_not_with_eva(init):
    """PiSSA/OLoRA train (the checkpoint carries A0, B0); an eva: section would replace them."""
    validate_run_config(_config(f"adapter.init_lora_weights={init}"))
    with pytest.raises(ValueError, match=rf"eva: adapter\.init_lora_weights='{init}'"):
        validate_run_config(_config(f"adapter.init_lora_weights={init}", "eva.rho=2.0"))


def test_loftq_run_config():
    """LoftQ: loftq_config fields under adapter.loftq_config (required, as PEFT); PEFT cannot verify the
    export (it needs the de-quantised base), so export.verify_with_peft is refused naming why."""
    loftq = ["adapter.init_lora_weights=loftq", "adapter.loftq_config.loftq_bits=2", "adapter.loftq_config.loftq_iter=3"]
    config = _config(*loftq)
    validate_run_config(config)
    assert (config.adapter.loftq_config.loftq_bits, config.adapter.loftq_config.loftq_iter) == (2, 3)
    with pytest.raises(ValueError, match="loftq_config"):
        _config("adapter.init_lora_weights=loftq")
    with pytest.raises(ValueError, match="verify_with_peft.*de-quantised base"):
        validate_run_config(_config(*loftq, "export.verify_with_peft=true", "export.peft_dir=x"))
