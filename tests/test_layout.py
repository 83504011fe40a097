"""The package's structure: no import cycles, and the core never imports a built-in part (issue 16)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vaeguard"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports() -> dict[str, set[str]]:
    """Every vaeguard module each module imports, at module level or inside functions."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vaeguard"):
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
                    break
    return graph


def test_no_module_imports_one_that_imports_it_back():
    graph = _imports()
    graph.pop("vaeguard")  # the package's face imports its parts; they may use its __version__
    for deps in graph.values():
        deps.discard("vaeguard")
    seen, on_path, cycles = set(), [], []

    def visit(node):
        if node in on_path:
            cycles.append([*on_path[on_path.index(node) :], node])
            return
        if node in seen:
            return
        seen.add(node)
        on_path.append(node)
        for dep in sorted(graph.get(node, ())):
            visit(dep)
        on_path.pop()

    for module in sorted(graph):
        visit(module)
    assert not cycles, f"import cycles: {cycles}"


def test_the_core_imports_no_built_in_part():
    """Built-ins are plugins like any other: the core reaches them only through the plugin manager."""
    offenders = {
        module: sorted(dep for dep in deps if dep.startswith("vaeguard.components"))
        for module, deps in _imports().items()
        if not module.startswith("vaeguard.components")
    }
    assert not {m: d for m, d in offenders.items() if d}


def test_the_contract_is_importable_on_its_own():
    from vaeguard import parts

    assert issubclass(parts.Likelihood, __import__("torch").nn.Module)
    from vaeguard.components.likelihoods import Likelihood  # the old place still names the same class

    assert Likelihood is parts.Likelihood


#: Names under which modules hold a detector or its networks.
HOLDERS = {"det", "est", "estimator", "detector", "model", "window_model_", "model_", "models_"}


def test_no_module_reaches_into_a_detectors_private_parts():
    """Outside estimators.py (and the mixins it is made of, which use ``self``), modules use a detector's
    public interface: to_model_space / from_model_space, coding_model, model_file_contents, ..."""
    offenders = []
    for name, path in _modules().items():
        if name == "vaeguard.estimators":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
                continue
            holder = node.value
            label = (
                holder.id if isinstance(holder, ast.Name) else holder.attr if isinstance(holder, ast.Attribute) else ""
            )
            if label in HOLDERS:
                offenders.append(f"{name}:{node.lineno} {label}.{node.attr}")
    assert not offenders, offenders


def test_mixins_use_only_their_hosts_public_interface():
    """A mixin (latent-space generation, presets) calls its own private helpers and its host's public
    methods and fitted attributes, never the host's private ones."""
    offenders = []
    for name, path in _modules().items():
        for cls in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(cls, ast.ClassDef) and cls.name.endswith("Mixin")):
                continue
            own = {item.name for item in cls.body if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))}
            for node in ast.walk(cls):
                if (
                    isinstance(node, ast.Attribute)
                    and isinstance(node.value, ast.Name)
                    and node.value.id == "self"
                    and node.attr.startswith("_")
                    and not node.attr.startswith("__")
                    and node.attr not in own
                ):
                    offenders.append(f"{name}:{node.lineno} {cls.name} uses self.{node.attr}")
    assert not offenders, offenders
