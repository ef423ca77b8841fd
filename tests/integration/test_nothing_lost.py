"""The offline commands as a careless or unlucky user runs them: every refusal is one line with
exit code 2, names the path or tensor, and leaves every input byte-identical (sha256 of every
file before and after).  Oracle for the accepted cases: the export of the untouched checkpoint."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from parallel_adapters.checkpoint.files import file_record
from tests.integration.test_cli_export import saved  # noqa: F401,F811  (the fixture: HF base + TP=2 checkpoint)

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "parallel_adapters", *map(str, args)], capture_output=True,
                          text=True, timeout=180, cwd=cwd)


def _digests(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")) if Path(root).is_dir() else [Path(root)]:
            if path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _refused(result, *needles):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.startswith("parallel-adapters ")]
    assert len(lines) == 1, result.stderr  # (a progress bar may precede it)
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def world(saved, tmp_path):  # noqa: F811  (pytest passes the imported fixture)
    """A private copy of the run: <tmp>/hf (HF base), <tmp>/ckpt/{step-1, latest}."""
    hf = shutil.copytree(saved["hf"], tmp_path / "hf")
    run = tmp_path / "ckpt"
    step = shutil.copytree(saved["ckpt"], run / "step-1")
    (run / "latest").write_text("step-1\n")
    return {"hf": hf, "run": run, "step": step, "tmp": tmp_path}


@pytest.mark.parametrize("target", ["hf", "run", "step", "shards"])
def test_export_and_consolidate_never_write_into_their_inputs(world, target):
    out = {"hf": world["hf"], "run": world["run"], "step": world["step"], "shards": world["step"] / "shards"}[target]
    before = _digests(world["hf"], world["run"])
    _refused(_cli("export", world["step"], "--out", out, "--hf-config", world["hf"], "--overwrite"), f"--out {out}")
    _refused(_cli("consolidate", world["step"], "--out", out, "--overwrite"), f"--out {out}")
    _refused(_cli("merge", world["step"], "--base", world["hf"], "--out", out, "--overwrite"), f"--out {out}")
    assert _digests(world["hf"], world["run"]) == before


def test_non_empty_file_and_repeat_outputs(world):
    tmp, step, hf = world["tmp"], world["step"], world["hf"]
    busy = tmp / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    (tmp / "a_file").write_text("keep me too")
    before = _digests(busy, tmp / "a_file", hf, world["run"])
    _refused(_cli("export", step, "--out", busy, "--hf-config", hf), "not empty", str(busy))
    _refused(_cli("consolidate", step, "--out", busy, "--overwrite"), "not empty")
    _refused(_cli("merge", step, "--base", hf, "--out", tmp / "a_file"), "is a file")
    _refused(_cli("export", step, "--out", tmp / "a_file" / "sub", "--hf-config", hf), "a_file")
    assert _digests(busy, tmp / "a_file", hf, world["run"]) == before
    out = tmp / "peft"
    assert _cli("export", step, "--out", out, "--hf-config", hf).returncode == 0
    first = _digests(out)
    _refused(_cli("export", step, "--out", out, "--hf-config", hf), "--overwrite")
    assert _digests(out) == first
    done = _cli("export", step, "--out", out, "--hf-config", hf, "--overwrite")
    assert done.returncode == 0, done.stderr
    assert _digests(out) == first  # the same adapter, written again atomically
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith(".")) == []  # no temporaries


def _plant(step: Path, mutate_tensors=None, mutate_config=None) -> None:
    """Change a checkpoint's content and re-record its checksums (a checkpoint saved with bad values)."""
    index = json.loads((step / "index.json").read_text())
    if mutate_tensors is not None:
        rel = sorted(r for r in index["files"] if r.startswith("shards/"))[0]
        tensors = load_file(str(step / rel))
        mutate_tensors(tensors)
        save_file(tensors, str(step / rel))
        index["files"][rel] = file_record(step / rel)
    if mutate_config is not None:
        config = json.loads((step / "adapter_config.json").read_text())
        mutate_config(config)
        (step / "adapter_config.json").write_text(json.dumps(config))  # json writes NaN as a bare NaN
        index["files"]["adapter_config.json"] = file_record(step / "adapter_config.json")
    (step / "index.json").write_text(json.dumps(index))


def _first_factor(tensors: dict) -> str:
    return sorted(n for n in tensors if n.endswith(".weight") and tensors[n].is_floating_point())[0]


def test_a_nan_factor_is_reported_by_verify_and_refused_by_export_and_merge(world):
    step, hf, tmp = world["step"], world["hf"], world["tmp"]
    names = []

    def poison(tensors):
        names.append(_first_factor(tensors))
        tensors[names[0]].view(-1)[0] = float("nan")

    _plant(step, mutate_tensors=poison)
    before = _digests(hf, world["run"])
    _refused(_cli("verify", step), names[0], "non-finite")
    _refused(_cli("export", step, "--out", tmp / "peft", "--hf-config", hf), names[0], "--allow-nonfinite")
    _refused(_cli("merge", step, "--base", hf, "--out", tmp / "merged"), "non-finite", "--allow-nonfinite")
    assert not (tmp / "peft").exists() and not (tmp / "merged").exists()
    assert _digests(hf, world["run"]) == before
    done = _cli("export", step, "--out", tmp / "peft", "--hf-config", hf, "--allow-nonfinite")
    assert done.returncode == 0, done.stderr
    exported = load_file(str(tmp / "peft" / "adapter_model.safetensors"))
    assert sum(int(torch.isnan(t).sum()) for t in exported.values()) > 0


def test_a_nan_config_value_is_refused(world):
    step, hf, tmp = world["step"], world["hf"], world["tmp"]
    _plant(step, mutate_config=lambda c: c.update(lora_alpha=float("nan")))
    before = _digests(hf, world["run"])
    _refused(_cli("verify", step), "adapter_config.json: lora_alpha", "non-finite")
    _refused(_cli("export", step, "--out", tmp / "peft", "--hf-config", hf), "lora_alpha")
    _refused(_cli("merge", step, "--base", hf, "--out", tmp / "merged"), "lora_alpha")
    assert _digests(hf, world["run"]) == before and not (tmp / "peft").exists()


def test_an_overflowing_delta_is_refused_by_export_and_safe_merge(world):
    step, hf, tmp = world["step"], world["hf"], world["tmp"]
    _plant(step, mutate_tensors=lambda t: [v.fill_(1e25) for n, v in t.items() if v.is_floating_point()])
    _refused(_cli("export", step, "--out", tmp / "peft", "--hf-config", hf), "overflows float32")
    _refused(_cli("merge", step, "--base", hf, "--out", tmp / "merged", "--safe-merge"), "merged weight", "non-finite")
    assert not (tmp / "merged").exists() and sorted(p.name for p in tmp.iterdir()) == ["ckpt", "hf"]


def test_raw_traceback_cases_are_one_line(world, tmp_path):
    hf, step = world["hf"], world["step"]
    # a damaged PEFT directory for merge
    peft = tmp_path / "peft_bad"
    peft.mkdir()
    (peft / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (peft / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header....")
    _refused(_cli("merge", peft, "--base", hf, "--out", tmp_path / "m1"), "adapter_model.safetensors")
    # deeply nested JSON
    (peft / "adapter_config.json").write_text("[" * 100000 + "]" * 100000)
    _refused(_cli("merge", peft, "--base", hf, "--out", tmp_path / "m2"), "adapter_config.json")
    # a lying index: a 10^12-element global shape
    index = json.loads((step / "index.json").read_text())
    name = sorted(index["tensors"])[0]
    index["tensors"][name]["global_shape"] = [10**6, 10**6]
    (step / "index.json").write_text(json.dumps(index))
    _refused(_cli("export", step, "--out", tmp_path / "e", "--hf-config", hf), name.rsplit(".lora", 1)[0], "1000000")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_train_and_evaluate_config_and_input_errors(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("optim: {lr: [1, 2\n")
    _refused(_cli("train", cfg, "--no-resume", "optim.steps=2"), str(cfg), "not a valid YAML")
    cfg.write_text("optim: !!python/object/apply:os.system ['true']\n")
    _refused(_cli("train", cfg), str(cfg))
    _refused(_cli("train", ROOT / "configs/tiny.yaml", "--no-resume", "optim.lr=.nan"), "optim.lr", "nan")
    _refused(_cli("train", ROOT / "configs/tiny.yaml", "adapter.lora_alpha=.inf", "--no-resume"), "adapter.lora_alpha")
    train = ("train", ROOT / "configs/tiny.yaml", "parallel.tensor=1", "eva=null", "export.peft_dir=null",
             "export.verify_with_peft=false", "checkpoint.directory=null", "checkpoint.save_every=0", "optim.steps=1",
             "optim.warmup_steps=0",
             "logging.metrics_jsonl=null")
    for name, content, needle in (("a.jsonl", '["not", "an object"]\n', "a.jsonl:1: each line must be a JSON object"),
                                  ("b.jsonl", '{"text": 5}\n', "b.jsonl:1: 'text' must be a string"),
                                  ("c.txt", b"\xff\xfe text", "c.txt: not UTF-8 text")):
        data = tmp_path / name
        data.write_bytes(content if isinstance(content, bytes) else content.encode())
        _refused(_cli(*train, f"data.paths=[{data}]", cwd=tmp_path), needle)
    ids = tmp_path / "ids.txt"
    ids.write_text("1 2 -3\n")
    out = tmp_path / "logits.safetensors"
    _refused(_cli("evaluate", ROOT / "configs/tiny.yaml", "--checkpoint", tmp_path, "--tokens", ids, "--out", out),
             "negative")
    ids.write_text("1 2 3\n")
    existing = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(2)}, str(existing))
    before = _digests(existing, ids)
    ckpt = tmp_path / "ckpt"
    _refused(_cli("evaluate", ROOT / "configs/tiny.yaml", "--checkpoint", ckpt, "--tokens", ids,
                  "--out", existing, "--overwrite"), str(existing), "not an output")
    _refused(_cli("evaluate", ROOT / "configs/tiny.yaml", "--checkpoint", ckpt, "--tokens", ids, "--out", ids),
             "is the --tokens file")
    assert _digests(existing, ids) == before
