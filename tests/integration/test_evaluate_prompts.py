"""`evaluate` on prompts of any length, under every TP size and with sequence parallelism.

Under sequence parallelism the activations are split along the sequence between the TP ranks,
so a prompt whose length does not divide by TP is right-padded (`mcore.gpt.pad_right`) and the
padded positions are dropped.  Oracle: PEFT + transformers on the UNPADDED prompts, with the
adapter exported from the same checkpoint: same logits (1e-4) and the perplexity they imply.
The model has 12 heads in 6 KV groups (TP=2 and TP=3 split them); the prompts have 10, 8 and 7 tokens
(10 and 8 do not divide by 3, 7 not by 2).
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from parallel_adapters.checkpoint.export import export_peft_from_checkpoint
from tests.helpers.tiny_llama import TINY_TP3, make_tiny_llama, sample_ids
from tests.mcore import hf_jobs

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # in PEFT
PROMPTS = [torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(n)) for n in (10, 8, 7)]


def _config_text(hf_dir: Path) -> str:
    # data.seq_len only has to pass the SP layout check (it divides by 1, 2 and 3); evaluate reads no data.
    return (f"model:\n  hf_checkpoint: {hf_dir}\ndata:\n  seq_len: 12\n  tokenizer: byte\n"
            "adapter:\n  r: 4\n  target_modules: [linear_qkv, linear_proj, linear_fc1, linear_fc2]\n")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, pool2):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("evaluate")
    hf_dir = make_tiny_llama(root / "hf", **TINY_TP3)
    pool2.run(hf_jobs.peft_job, str(hf_dir), str(root / "ckpt"), sample_ids())  # non-zero B on all linears
    peft_dir = export_peft_from_checkpoint(root / "ckpt", root / "peft", hf_dir)
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32), peft_dir).eval()
    with torch.no_grad():
        expected = [model(input_ids=p.unsqueeze(0)).logits[0].float() for p in PROMPTS]
        base = [LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)(input_ids=p.unsqueeze(0)).logits[0]
                for p in PROMPTS]
    assert max((e - b).abs().max().item() for e, b in zip(expected, base)) > 1e-3, "the adapter must change the logits"
    nll = sum(F.cross_entropy(lg[:-1].double(), p[1:], reduction="sum").item() for lg, p in zip(expected, PROMPTS))
    (root / "ids.txt").write_text("\n".join(" ".join(map(str, p.tolist())) for p in PROMPTS) + "\n")
    (root / "run.yaml").write_text(_config_text(hf_dir))
    return {"root": root, "expected": expected, "perplexity": math.exp(nll / sum(len(p) - 1 for p in PROMPTS))}


def evaluate_job(config: str, overrides: list[str], checkpoint: str, tokens: str, out: str) -> float | None:
    """run_evaluation on the pool's ranks (the writing rank returns the perplexity)."""
    from parallel_adapters.train.evaluate import run_evaluation
    from parallel_adapters.train.run_config import load_run_config

    return run_evaluation(load_run_config(config, overrides), checkpoint, tokens, out)


def _check(setup, out: Path, perplexity: float | None = None) -> None:
    got = load_file(str(out))
    assert sorted(got) == [f"logits.{i}" for i in range(len(PROMPTS))] + ["perplexity"]
    for i, expected in enumerate(setup["expected"]):
        assert got[f"logits.{i}"].shape == expected.shape == (len(PROMPTS[i]), 101)
        torch.testing.assert_close(got[f"logits.{i}"], expected, atol=1e-4, rtol=0)
    assert got["perplexity"].item() == pytest.approx(setup["perplexity"], rel=1e-5)
    if perplexity is not None:
        assert perplexity == pytest.approx(setup["perplexity"], rel=1e-5)


@pytest.mark.parametrize("tp, sp", [(1, False), (1, True), (2, False), (2, True), (3, False), (3, True)])
def test_evaluate_matches_peft_for_prompts_of_any_length(setup, request, tp, sp):
    pool = request.getfixturevalue("pool3" if tp == 3 else "pool2")
    root, out = setup["root"], setup["root"] / f"tp{tp}-sp{int(sp)}.safetensors"
    overrides = [f"parallel.tensor={tp}", f"parallel.sequence_parallel={str(sp).lower()}"]
    results = pool.run(evaluate_job, str(root / "run.yaml"), overrides, str(root / "ckpt"), str(root / "ids.txt"),
                       str(out))
    assert sum(r is not None for r in results) == 1  # one writer
    _check(setup, out, next(r for r in results if r is not None))


def test_evaluate_command_at_tp3_with_sequence_parallelism(setup):
    """The command as a user runs it: torchrun, three ranks, a 10-token prompt that TP=3 cannot split."""
    root, out = setup["root"], setup["root"] / "cli-tp3-sp.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3", "-m",
           "parallel_adapters", "evaluate", str(root / "run.yaml"), "parallel.tensor=3",
           "parallel.sequence_parallel=true", "--checkpoint", str(root / "ckpt"), "--tokens", str(root / "ids.txt"),
           "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "over 22 predicted tokens" in done.stdout
    _check(setup, out)
