"""The package's shape: no import cycle between its modules, and no module importing a part above
its own (the memory and the checkpoint files at the bottom, the fairseq patches and tools at the
top). Checked on the source, imports inside functions included."""

import ast
import os
from typing import Dict, Set

from conftest import REPO

PACKAGE = "fairseq_longmem"

# a module may import modules of its own layer or a lower one; the package root (the plugin entry)
# is left out: every subpackage reads require_fairseq from it
LAYERS = [
    ("fairseq_longmem.checkpoint", "fairseq_longmem.memory", "fairseq_longmem.fileio",
     "fairseq_longmem.buckets", "fairseq_longmem.tokenizer_files"),
    ("fairseq_longmem.modules", "fairseq_longmem.families"),
    ("fairseq_longmem.models", "fairseq_longmem.criterions", "fairseq_longmem.families.gpt2.model",
     "fairseq_longmem.families.llama.model"),
    ("fairseq_longmem.tasks",),
    # a family's Hugging Face converter (families/<family>/hf.py) sits with the converter
    ("fairseq_longmem.fairseq_patches", "fairseq_longmem.convert_hf_gpt2",
     "fairseq_longmem.convert", "fairseq_longmem.families.gpt2.hf",
     "fairseq_longmem.families.llama.hf", "fairseq_longmem.hf_tokenizer_bpe",
     "fairseq_longmem.user_dir"),
]


def modules() -> Dict[str, str]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for folder, _, files in os.walk(os.path.join(REPO, PACKAGE)):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), REPO)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                found[".".join(rel)] = os.path.join(folder, f)
    return found


def imports(name: str, path: str, known: Set[str]) -> Set[str]:
    """The package's modules that ``name`` imports anywhere in its source."""
    is_pkg = path.endswith("__init__.py")
    package = name if is_pkg else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            # ``from pkg import mod`` depends on pkg.mod, not on pkg's __init__; a name that is
            # not a module is read from pkg itself
            subs = [f"{base}.{a.name}" for a in node.names]
            targets = [t for t in subs if t in known]
            if len(targets) < len(subs):
                targets.append(base)
        else:
            continue
        for t in targets:
            while t and t not in known:  # a name imported from a module: the module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def layer(name: str) -> int:
    """The layer of the longest prefix that holds ``name`` (a family's fairseq models sit
    above its torch modules)."""
    found = [(len(p), i) for i, prefixes in enumerate(LAYERS) for p in prefixes
             if name == p or name.startswith(p + ".")]
    if not found:
        raise AssertionError(f"{name} is in no layer of tests/test_layout.py: place it")
    return max(found)[1]


def graph():
    mods = modules()
    return {n: imports(n, p, set(mods)) - {PACKAGE} for n, p in mods.items() if n != PACKAGE}


def test_no_module_imports_a_part_above_its_own():
    upward = sorted(f"{a} -> {b}" for a, deps in graph().items() for b in deps
                    if layer(b) > layer(a))
    assert upward == []


def test_no_import_cycle():
    g = graph()
    cycles, state = [], {}

    def visit(n, stack):
        state[n] = 1
        for d in sorted(g.get(n, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n, [n])
    assert cycles == []


def test_layout_sees_the_imports():
    """The checks above are only as good as the import parsing: known edges are found."""
    g = graph()
    assert "fairseq_longmem.memory.bank" in g["fairseq_longmem.models.longmem"]
    assert "fairseq_longmem.checkpoint.guard" in g["fairseq_longmem.checkpoint.read"]
    assert "fairseq_longmem.memory.search_triton" in g["fairseq_longmem.memory.search"]
