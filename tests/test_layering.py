"""The package's layers, checked from the source: every import inside ``bivlm_kernels`` (module level or inside a
function) goes down or sideways within its own layer, never up, and the packages import each other without a
cycle. The order (README, "Layout"):

    formats -> ops -> backends -> nn -> checkpoint -> models -> quant -> evaluation -> integrations -> cli

``bivlm_kernels/__init__.py`` (the public facade) may import anything. ``ops.dispatch`` loads the compiled
backends by module name on first use (a plugin load, not an import), which this check does not see by design.
"""
import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "bivlm_kernels"
LAYERS = ["formats", "ops", "backends", "nn", "checkpoint", "models", "quant", "evaluation", "integrations", "cli"]
EXTENSIONS = {"_C": "backends", "_C_cpu": "backends"}       # compiled modules belong to the backends layer
SIBLINGS_APART = {"integrations"}                            # their modules never import each other


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: pathlib.Path):
    """``(lineno, absolute module name)`` of every import in ``path`` that names a bivlm_kernels module."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("bivlm_kernels"):
                    yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("bivlm_kernels"):
                continue
            # "from . import x" names submodules: judge each of them
            subs = [f"{mod}.{a.name}" for a in node.names] if not node.module or mod.count(".") == 0 else [mod]
            for m in subs:
                yield node.lineno, m


def layer_of(mod: str):
    parts = mod.split(".")
    if len(parts) < 2:
        return None                              # the package facade itself
    top = EXTENSIONS.get(parts[1], parts[1])
    return top if top in LAYERS else None


def all_modules():
    return sorted(p for p in PKG.rglob("*.py") if "data" not in p.relative_to(PKG).parts)


def violations(paths):
    out = []
    for path in paths:
        me = module_name(path)
        mine = layer_of(me)
        if mine is None:
            continue
        for line, target in imports_of(path):
            theirs = layer_of(target)
            if theirs is None and target != "bivlm_kernels":
                continue
            if target == "bivlm_kernels" or target.startswith("bivlm_kernels.__"):
                # "from .. import __version__" is metadata, not a layer
                if target.endswith("__version__"):
                    continue
                out.append(f"{me}:{line} imports the package facade ({target}); import the module itself")
                continue
            if LAYERS.index(theirs) > LAYERS.index(mine):
                out.append(f"{me}:{line} ({mine}) imports {target} ({theirs}): a lower layer reaching up")
            elif theirs == mine in SIBLINGS_APART and target.split(".")[2:3] != me.split(".")[2:3]:
                out.append(f"{me}:{line} imports its sibling {target}: integrations stay apart")
    return out


def test_every_import_goes_down_the_layers():
    assert not violations(all_modules()), "\n".join(violations(all_modules()))


def test_no_import_cycle_between_packages():
    """Subpackages of a layer (quant.methods, quant.luq, backends.cuda, ...) import each other without a cycle."""
    graph = {}
    for path in all_modules():
        me = module_name(path).split(".")
        if len(me) < 3:
            continue
        src = ".".join(me[:3]) if (PKG / me[1] / me[2]).is_dir() else ".".join(me[:2])
        for _, target in imports_of(path):
            t = target.split(".")
            if len(t) < 2 or layer_of(target) is None:
                continue
            dst = ".".join(t[:3]) if len(t) > 2 and (PKG / t[1] / t[2]).is_dir() else ".".join(t[:2])
            if dst != src:
                graph.setdefault(src, set()).add(dst)
    seen, stack = set(), []

    def visit(n):
        if n in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
        if n in seen:
            return
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            visit(m)
        stack.pop()
        seen.add(n)

    for n in sorted(graph):
        visit(n)


@pytest.mark.parametrize("where,source,expect", [
    ("formats", "from ..quant import driver\n", "reaching up"),
    ("formats", "from .. import checkpoint\n", "reaching up"),
    ("ops", "from ..nn import QuantLinear\n", "reaching up"),
    ("integrations", "from .hf_quantizer import QUANT_METHOD\n", "stay apart"),
    ("checkpoint", "from ..quant import QuantConfig\n", "reaching up"),
    ("models", "from ..evaluation import perplexity\n", "reaching up"),
])
def test_planted_upward_imports_are_caught(where, source, expect):
    """A module planted in a layer that imports upward (or sideways between integrations) is reported."""
    planted = PKG / where / "_planted_layer_probe.py"
    planted.write_text(source)
    try:
        found = violations([planted])
    finally:
        planted.unlink()
    assert found and expect in found[0], found

