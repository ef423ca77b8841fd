"""The real-model demo's code path end to end, on a tiny GGUF instead of SmolLM2 (no download):
`python -m parallel_adapters.real_demo prepare` (conversion, held-out ids) and the torchrun job at
TP=3 with sequence parallelism (fine-tune, PEFT export and check, held-out perplexity before and
after on paragraphs of any length, sample generations, summary), as scripts/demo.sh --real runs them.
"""
import json
import os
import re
import subprocess
import sys

from tests.helpers.tiny_gguf import SHAPE_TP3, make_tiny_gguf


def test_real_demo_on_a_tiny_gguf(tmp_path):
    gguf_file = make_tiny_gguf(tmp_path / "model", SHAPE_TP3)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PA_DEMO_GGUF": str(gguf_file)}
    run = dict(cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    prep = subprocess.run([sys.executable, "-m", "parallel_adapters.real_demo", "prepare"], **run)
    assert prep.returncode == 0, prep.stdout[-3000:] + prep.stderr[-3000:]
    prepared = json.loads((tmp_path / "runs/demo-real/prepare.json").read_text())
    assert prepared["source"] == "PA_DEMO_GGUF" and not prepared["cached"]
    assert any(n % 3 for n in prepared["heldout_lengths"]), "some paragraph must need padding at TP=3"
    assert (tmp_path / "runs/smollm2-hf/model.safetensors").is_file()

    demo = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3",
                           "-m", "parallel_adapters.real_demo", "optim.steps=8", "optim.lr=1e-2"], **run)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    table = demo.stdout[demo.stdout.index("real-model demo summary"):]
    rows = dict(line.split("  ", 1) for line in table.splitlines()[2:] if "  " in line)
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    assert rows["layout"] == "TP=3, sequence parallel on, 3 CPU ranks"
    before, after = (float(x) for x in rows["held-out perplexity"].split(" (")[0].split(" -> "))
    assert after < before
    diff, limit = (float(x) for x in re.findall(r"[0-9.]+e[-+][0-9]+", rows["PEFT + transformers vs Megatron"]))
    assert diff <= limit == 1e-4  # the tiny model's logits stay under 10
    assert rows["steps, throughput"].startswith("8,")
    assert "'The capital of France is' base" in rows and "'The capital of France is' adapted" in rows
    assert (tmp_path / "runs/demo-real/peft_adapter/adapter_model.safetensors").is_file()
