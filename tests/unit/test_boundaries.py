"""House rules, enforced: collectives only in distributed/collectives.py, megatron only under
mcore/, deepspeed only in train/engine.py, transformers/peft only in interop/, no pickle loads.
Parsed with ast, so comments and docstrings do not count."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "parallel_adapters"
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv", "barrier",
               "all_gather_object", "broadcast_object_list", "batch_isend_irecv", "reduce", "gather", "scatter"}


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _rel(path):
    return path.relative_to(PACKAGE).as_posix()


def _imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def _dist_calls(tree):
    """Names called as dist.X / torch.distributed.X."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            base = ast.unparse(node.func.value)
            if base in ("dist", "torch.distributed", "c10d"):
                yield node.func.attr


@pytest.mark.parametrize("path", _modules(), ids=_rel)
def test_module_respects_boundaries(path):
    rel = _rel(path)
    tree = ast.parse(path.read_text())
    imports = set(_imports(tree))
    if not rel.startswith("mcore/"):
        assert not any(m.startswith(("megatron", "transformer_engine")) for m in imports), rel
    if rel != "train/engine.py":
        assert not any(m.startswith("deepspeed") for m in imports), rel
    if not rel.startswith("interop/"):
        assert not any(m.split(".")[0] in ("transformers", "peft") for m in imports), rel
    assert "pickle" not in {m.split(".")[0] for m in imports}, rel
    if rel != "distributed/collectives.py":
        assert not list(_dist_calls(tree)), f"{rel} calls collectives directly"
    source = path.read_text()
    assert "torch.load(" not in source and "pickle.load" not in source, rel


def test_modules_stay_small():
    long = {_rel(p): n for p in _modules() if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"modules over 400 lines: {long}"
