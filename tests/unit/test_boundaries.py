"""House rules, enforced: collectives only in distributed/collectives.py, megatron only under
mcore/, deepspeed only in train/engine.py, transformers/peft only in interop/, no pickle loads,
and packages depend in one direction only.  Parsed with ast, so comments and docstrings do not
count, and imports inside functions (lazy imports) count like any other.

Package order, bottom first (a package may import only packages below it, and only the edges
ALLOWED lists; docs/design.md section 3):

    user_errors, config, ops, storage,    leaves: user-error types, PEFT-style configs, pure tensor
    distributed                           ops, files on disk, groups/collectives/ShardSpec/agreement
    decompose                             QR/SVD of TP-sharded weights (PiSSA, OLoRA) without gathering them
    hf                                    Hugging Face config, names, files (no megatron)
    mcore                                 the only megatron importer
    adapters                              LoRA layers, injection, AdapterModel
    checkpoint                            our sharded format, PEFT export, merge
    eva                                   distributed EVA initialisation
    interop                               the only transformers/peft importer
    train                                 run config, engine, loop, runner
    demo, real_demo, cli, __main__        entry points
    (parallel_adapters/__init__.py: the public API, above everything; it imports lazily by name)
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "parallel_adapters"
ORDER = ["user_errors", "config", "ops", "storage", "distributed", "decompose", "hf", "mcore", "adapters", "checkpoint", "eva", "interop",
         "train", "demo", "real_demo", "cli", "__main__"]
"""Top-level packages and modules of parallel_adapters, bottom first."""
ALLOWED: dict[str, set[str]] = {
    "user_errors": set(),
    "config": set(),
    "ops": set(),
    "storage": set(),
    "distributed": {"user_errors"},
    "decompose": {"distributed"},
    "hf": {"distributed", "storage"},
    "mcore": {"distributed", "hf", "ops"},
    "adapters": {"config", "decompose", "distributed", "mcore", "ops"},
    "checkpoint": {"adapters", "config", "decompose", "distributed", "hf", "storage", "user_errors"},
    "eva": {"adapters", "checkpoint", "config", "distributed", "mcore"},
    "interop": set(),
    "train": {"adapters", "checkpoint", "config", "distributed", "eva", "interop", "mcore", "user_errors"},
    "demo": {"checkpoint", "distributed", "mcore", "train", "user_errors"},
    "real_demo": {"checkpoint", "distributed", "interop", "mcore", "train", "user_errors"},
    "cli": {"checkpoint", "train", "user_errors"},
    "__main__": {"cli"},
}
"""Which packages each one may import.  A new edge is added here deliberately, pointing down."""
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


def _unit(rel: str) -> str:
    """The top-level package (or root module) a module path belongs to: 'mcore/gpt.py' -> 'mcore'."""
    first = rel.split("/")[0]
    return first.removesuffix(".py")


def _package_imports(path: Path, tree: ast.AST):
    """(line, imported module) for every import of parallel_adapters, relative ones resolved."""
    here = ["parallel_adapters", *path.relative_to(PACKAGE).parent.parts]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            # `from parallel_adapters import mcore`, `from . import compat`: the names are modules
            names_are_modules = module == "parallel_adapters" or not node.module
            names = [f"{module}.{a.name}" for a in node.names] if names_are_modules else [module]
        else:
            continue
        yield from ((node.lineno, n) for n in names if n == "parallel_adapters" or n.startswith("parallel_adapters."))


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


def test_every_package_has_a_place_in_the_order():
    units = {_unit(_rel(p)) for p in _modules()} - {"__init__"}
    assert units == set(ORDER) == set(ALLOWED), (
        f"not in ORDER/ALLOWED: {sorted(units - set(ORDER))}; listed but absent: {sorted(set(ORDER) - units)}")


def test_allowed_edges_point_down_so_the_order_is_acyclic():
    up = [f"{src} -> {dst}" for src, dsts in ALLOWED.items() for dst in dsts if ORDER.index(dst) >= ORDER.index(src)]
    assert not up, f"edges that do not point down the order: {up}"


@pytest.mark.parametrize("path", _modules(), ids=_rel)
def test_module_imports_only_allowed_packages(path):
    rel = _rel(path)
    src = _unit(rel)
    if src == "__init__":  # the public API: it may name anything (and does so lazily, by string)
        return
    bad = []
    for line, module in _package_imports(path, ast.parse(path.read_text())):
        parts = module.split(".")
        dst = parts[1] if len(parts) > 1 else "parallel_adapters"
        if not ((PACKAGE / dst).is_dir() or (PACKAGE / f"{dst}.py").is_file()):
            dst = "parallel_adapters"  # a name of the public API (package __init__), above everything
        if dst != src and dst not in ALLOWED.get(src, set()):
            bad.append(f"{rel}:{line} imports {module} ({src} -> {dst} is not an allowed edge)")
    assert not bad, "\n".join(bad)
