"""The house in layers: every import of lota_cli, function-level ones included, read with `ast` (nothing is
run), runs down the floors below, never up or sideways; there is no import cycle; no private name (a name
or a module starting with `_`) is imported from another module or package; and no stage imports another.
README.md's "How it is built" is this table in words."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lota_cli"

# From the ground up: a room may import rooms on lower floors only (rooms on one floor never import each other).
FLOORS = [
    {"lota_cli", "console"},  # the floor: LotaError, first_line, the version, the cache's place; stderr output
    {"tensors"},  # dtypes, packed bits, fingerprints, views of stored data: numpy only
    {"native"},  # the C kernels and their numpy fallbacks
    {"io"},  # safetensors files, memory maps, direct-I/O writes, atomic directories, HF model directories
    {"artifacts"},  # lota's file format: metadata, the torch-free reader, the torch side, the writers
    {"ops"},  # top-k selection, merge methods, overlap statistics
    {"config"},  # the option machinery, the stage schemas, the parameter selection, Hydra's registry
    {"runs"},  # a training run outside its model, torch-free: launching its processes, its checkpoints' places
    {"data"},  # rows, encoding and its cache, batches
    {"models"},  # HF loading and saving, weights, LoRA, token losses
    {"interop"},  # PEFT adapters
    {"inputs"},  # opening whatever path a stage was given
    {"evaluation", "training"},  # scores and backends; the loop, objectives, engines, checkpoints, sparse layers
    {"workflows"},  # the streaming merge, the mask sources
    {"stages"},  # one module per stage
    {"cli"},  # the command
    {"testing", "__main__"},  # running the command from tests and scripts; `python -m lota_cli`
]
FLOOR = {room: level for level, rooms in enumerate(FLOORS) for room in rooms}


def module_names(root: Path) -> dict[str, Path]:
    """lota_cli's modules by dotted name (a package by its own name, for its __init__)."""
    names = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "lota_cli"


def imports(path: Path, module: str, known: dict[str, Path]):
    """(line, imported lota_cli module, the names taken from it or None for the module itself) of every import
    in the file, at any depth."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "lota_cli":
                    yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "lota_cli":
                continue
            for alias in node.names:
                if f"{base}.{alias.name}" in known:  # a submodule, imported as a name of its package
                    yield node.lineno, f"{base}.{alias.name}", None
                else:
                    yield node.lineno, base, alias.name


def violations(root: Path = PACKAGE) -> list[str]:
    known = module_names(root)
    found, edges = [], {name: set() for name in known}
    for module, path in sorted(known.items()):
        where = f"{path.relative_to(root.parent)}"
        here = room(module)
        if here not in FLOOR:
            found.append(f"{where}: room {here!r} is on no floor of tests/test_layers.py's FLOORS")
            continue
        for line, target, name in imports(path, module, known):
            if target not in known:
                found.append(f"{where}:{line}: imports {target}, which does not exist")
                continue
            edges[module].add(target)
            there = room(target)
            if there != here and there in FLOOR and FLOOR[there] >= FLOOR[here]:
                way = "up" if FLOOR[there] > FLOOR[here] else "sideways"
                found.append(f"{where}:{line}: {here} (floor {FLOOR[here]}) imports {target} (floor {FLOOR[there]}): "
                             f"{way}")
            if here == there == "stages" and module != "lota_cli.stages" and target != "lota_cli.stages":
                found.append(f"{where}:{line}: a stage imports another stage ({target})")
            private_module = any(part.startswith("_") and part != "__main__" for part in target.split(".")[2:])
            if private_module and there != here:
                found.append(f"{where}:{line}: imports {target}, a private module of another package")
            if name is not None and name.startswith("_") and not name.endswith("__") and target != module:
                found.append(f"{where}:{line}: imports the private name {name} from {target}")
    found += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(edges)]
    return found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules that import each other (Tarjan)."""
    index, low, stack, on_stack, groups, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in edges.get(node, ()):
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return [group + [group[0]] for group in groups]


def test_imports_run_down_the_floors_with_no_cycle_and_no_private_names():
    assert violations() == []


@pytest.mark.parametrize("added, says", [
    ("from lota_cli.training import train\n", "tensors (floor 1) imports lota_cli.training (floor 12): up"),
    ("def f():\n    from lota_cli.stages import merge\n", "tensors (floor 1) imports lota_cli.stages.merge"),
    ("from lota_cli.io._mapping import mapped\n", "a private module of another package"),
    ("from lota_cli.native import _kernels\n", "a private module of another package"),
    ("from lota_cli.ops._top_k import _float_bits\n", "the private name _float_bits"),
])
def test_an_import_against_the_order_is_caught(tmp_path, added, says):
    """The check fails when such an import is added on purpose (to a copy of the package)."""
    copy = tmp_path / "lota_cli"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "conf"))
    target = copy / "tensors" / "_bits.py"
    target.write_text(target.read_text() + "\n" + added)
    found = violations(copy)
    assert any(says in line for line in found), found
    assert all("tensors/_bits.py" in line or line.startswith("import cycle:") for line in found), found


def test_a_cycle_and_a_stage_importing_a_stage_are_caught(tmp_path):
    copy = tmp_path / "lota_cli"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "conf"))
    (copy / "stages" / "export.py").write_text((copy / "stages" / "export.py").read_text()
                                               + "\nfrom lota_cli.stages import merge\n")
    bits = copy / "tensors" / "_bits.py"
    bits.write_text(bits.read_text() + "\nfrom lota_cli.tensors import _dtypes\n")
    dtypes = copy / "tensors" / "_dtypes.py"
    dtypes.write_text(dtypes.read_text() + "\nfrom lota_cli.tensors import _bits\n")
    found = violations(copy)
    assert any("a stage imports another stage (lota_cli.stages.merge)" in line for line in found), found
    assert any(line.startswith("import cycle:") and "lota_cli.tensors._bits" in line for line in found), found


def test_every_package_lists_its_public_names():
    """Each package's __init__ hands on public names from its private files, listed in __all__, each one there."""
    import importlib

    for module, path in module_names(PACKAGE).items():
        if path.name != "__init__.py" or module in ("lota_cli", "lota_cli.stages"):
            continue
        package = importlib.import_module(module)
        assert isinstance(getattr(package, "__all__", None), list) and package.__all__, module
        assert len(set(package.__all__)) == len(package.__all__), module
        for name in package.__all__:
            assert not name.startswith("_") and getattr(package, name, None) is not None, (module, name)
