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
    "endor_ray.compress": 4, "endor_ray.engine": 4,
    "endor_ray.service": 5,
    "endor_ray.serve": 6, "endor_ray.jobs": 6,
    "endor_ray.cli": 7,
}
# The package root (connect() and the version) is a module of its own, not a prefix of every stage:
# a new subpackage that is not in RANKS has no stage and fails `test_every_module_has_a_stage`.
ROOT_MODULE, ROOT_RANK = "endor_ray", 7
FORBIDDEN = {  # third-party packages a stage must not import at all
    "endor_ray.errors": {"torch", "ray", "triton", "transformers"},
    "endor_ray.utils": {"ray", "triton", "transformers"},
    "endor_ray.format": {"ray", "triton", "transformers"},
    "endor_ray.models": {"ray", "triton"},
    "endor_ray.kernels": {"ray", "transformers"},
    "endor_ray.store": {"ray", "triton"},
    "endor_ray.compress": {"ray", "triton"},
    "endor_ray.engine": {"ray"},
}


def module_files() -> dict[str, Path]:
    files = {}
    for path in sorted((ROOT / "endor_ray").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


MODULES = module_files()


def stage_of(module: str) -> str | None:
    """The longest RANKS key that is `module` or a package above it; the root module is its own
    stage; None for a module under no known stage."""
    if module == ROOT_MODULE:
        return ROOT_MODULE
    candidates = [stage for stage in RANKS if module == stage or module.startswith(stage + ".")]
    return max(candidates, key=len) if candidates else None


def rank_of(stage: str) -> int:
    return ROOT_RANK if stage == ROOT_MODULE else RANKS[stage]


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
    unknown = [module for module in MODULES if stage_of(module) is None]
    assert not unknown, f"modules under no stage of RANKS (add their package to RANKS): {unknown}"
    assert stage_of("endor_ray.compress.convert") == "endor_ray.compress"


def test_a_module_of_an_unknown_stage_fails():
    """The stage check is not vacuous: a module of a new subpackage has no stage, and so would
    fail `test_every_module_has_a_stage` until its package is ranked."""
    assert stage_of("endor_ray.newstage.thing") is None
    assert stage_of("endor_ray_other.thing") is None
    assert stage_of("endor_ray") == ROOT_MODULE and stage_of("endor_ray.cli") == "endor_ray.cli"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_imports_only_lower_stages(module):
    own = stage_of(module)
    for line, imported in imports_of(MODULES[module], module):
        top = imported.split(".")[0]
        assert top not in FORBIDDEN.get(own, set()), f"{module}:{line} imports {imported}, which {own} must not use"
        if top != "endor_ray" or imported == "endor_ray" and own == ROOT_MODULE:
            continue
        target = stage_of(imported)
        assert target is not None, f"{module}:{line} imports {imported}, which is under no stage of RANKS"
        assert target == own or rank_of(target) < rank_of(own), (
            f"{module}:{line} imports {imported} ({target}, rank {rank_of(target)}); {own} has rank "
            f"{rank_of(own)} and may import only its own package and lower stages"
        )


def test_the_check_catches_an_upward_import(tmp_path):
    """The rule is not vacuous: a format module importing the engine is refused."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from endor_ray.engine.engine import Engine\n    import ray\n")
    found = imports_of(bad, "endor_ray.format.bad")
    assert (2, "endor_ray.engine.engine") in found and (3, "ray") in found
    assert RANKS[stage_of("endor_ray.engine.engine")] > RANKS[stage_of("endor_ray.format.bad")]
    assert "ray" in FORBIDDEN["endor_ray.format"]


def test_compression_and_the_engine_do_not_import_each_other():
    """Same rank, different stages: neither may import the other (the store sits below both)."""
    assert stage_of("endor_ray.compress.convert") != stage_of("endor_ray.engine.engine")
    assert RANKS["endor_ray.compress"] == RANKS["endor_ray.engine"] > RANKS["endor_ray.store"]


def test_every_package_lives_under_endor_ray():
    # Python puts the working directory first on sys.path, so a package at the top of a checkout
    # shadows any installed distribution of that name for whatever runs there: a top-level
    # `kernels/` was imported by transformers 5.25 in place of Hugging Face's `kernels`.
    top_level = sorted(path.parent.name for path in ROOT.glob("*/__init__.py"))
    assert top_level == ["endor_ray"]
