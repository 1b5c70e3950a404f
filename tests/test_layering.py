"""The package follows the data's path: a stage imports only the stages below it.

Every import statement counts, also those inside functions (lazy imports are still dependencies).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Lower stages first. A module may import its own package and packages of a strictly lower rank.
RANKS = {
    "endor_ray.errors": 0, "endor_ray._version": 0,
    "endor_ray.utils": 1,
    "endor_ray.format": 2, "endor_ray.models": 2,
    "endor_ray.kernels": 3, "endor_ray.store": 3,
    "endor_ray.engine": 4,
    "endor_ray.service": 5,
    "endor_ray.serve": 6, "endor_ray.jobs": 6,
    "endor_ray.cli": 7, "endor_ray": 7,  # the package root: connect() and the version
}
FORBIDDEN = {  # third-party packages a stage must not import at all
    "endor_ray.errors": {"torch", "ray", "triton", "transformers"},
    "endor_ray.utils": {"ray", "triton", "transformers"},
    "endor_ray.format": {"ray", "triton", "transformers"},
    "endor_ray.models": {"ray", "triton"},
    "endor_ray.kernels": {"ray", "transformers"},
    "endor_ray.store": {"ray", "triton"},
    "endor_ray.engine": {"ray"},
}


def module_files() -> dict[str, Path]:
    files = {}
    for path in sorted((ROOT / "endor_ray").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        name = "endor_ray.kernels" + ("" if path.stem == "__init__" else f".{path.stem}")
        files[name] = path
    return files


MODULES = module_files()


def stage_of(module: str) -> str:
    """The longest RANKS key that is `module` or a package above it."""
    candidates = [stage for stage in RANKS if module == stage or module.startswith(stage + ".")]
    return max(candidates, key=len)


def imports_of(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file."""
    found = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module
            submodules = [f"{name}.{alias.name}" for alias in node.names if f"{name}.{alias.name}" in MODULES]
            # `from endor_ray import errors` imports a module; `from endor_ray import connect`, a name
            found += [(node.lineno, sub) for sub in submodules] if submodules else [(node.lineno, name)]
    return found


def test_every_module_has_a_stage():
    assert len(MODULES) > 30
    for module in MODULES:
        assert stage_of(module) in RANKS


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_imports_only_lower_stages(module):
    own = stage_of(module)
    for line, imported in imports_of(MODULES[module], module):
        top = imported.split(".")[0]
        assert top not in FORBIDDEN.get(own, set()), f"{module}:{line} imports {imported}, which {own} must not use"
        if top != "endor_ray" or imported == "endor_ray" and own == "endor_ray":
            continue
        target = stage_of(imported)
        assert target == own or RANKS[target] < RANKS[own], (
            f"{module}:{line} imports {imported} ({target}, rank {RANKS[target]}); {own} has rank {RANKS[own]} "
            "and may import only its own package and lower stages"
        )


def test_the_check_catches_an_upward_import(tmp_path):
    """The rule is not vacuous: a format module importing the engine is refused."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from endor_ray.engine.engine import Engine\n    import ray\n")
    found = imports_of(bad, "endor_ray.format.bad")
    assert (2, "endor_ray.engine.engine") in found and (3, "ray") in found
    assert RANKS[stage_of("endor_ray.engine.engine")] > RANKS[stage_of("endor_ray.format.bad")]
    assert "ray" in FORBIDDEN["endor_ray.format"]
