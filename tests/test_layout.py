"""The package layout keeps its rules: dependencies point one way (shell -> models/ (the
offline side) -> serving -> features/model/resilience), `import ctr.settings` loads no server
stack, `ctr serve` loads no benchmark, and the README's package map names packages that exist."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CTR = ROOT / "ctr"

# Lower layers never import higher ones. A module may import its own layer and below.
LAYERS: list[tuple[str, ...]] = [
    ("ctr.settings", "ctr.buffered_metrics", "ctr.metrics", "ctr.degraded"),
    ("ctr.observe",),
    ("ctr.resilience",),
    ("ctr.features",),
    ("ctr.model",),
    (
        "ctr.api.contract",
        "ctr.api.body",
        "ctr.api.request_id",
        "ctr.api.openapi",
        "ctr.api.internal",
        "ctr.api.bentoml_compat",
    ),
    ("ctr.serving",),
    ("ctr.api.edge", "ctr.api.routes", "ctr.api.status", "ctr.api.canary", "ctr.api.bento"),
    ("models",),  # the offline side (data generation, training, evaluation): only the shell imports it
    ("ctr.bench", "ctr.ship", "ctr.cli"),
]
SHELL = ("ctr.bench", "ctr.ship", "ctr.cli")
# ctr/__init__.py imports nothing; ctr/api/__init__.py re-exports the contract only (the routes
# would be a cycle).
# ctr.serving.root composes the serving layer with the edge the routes read (ctr.api.edge).
EXACT = {"ctr": 0, "ctr.api": 5, "ctr.serving.root": 7}
OURS = ("ctr", "models")


def _layer(module: str) -> int | None:
    if module in EXACT:
        return EXACT[module]
    for n, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return n
    return None


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _ours(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in OURS)


def _imports(path: Path) -> set[str]:
    """Every `ctr.*` and `models.*` module a file imports, at the top, inside a function or
    under TYPE_CHECKING."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if _ours(a.name)}
        elif isinstance(node, ast.ImportFrom) and node.module and _ours(node.module):
            names = [f"{node.module}.{a.name}" for a in node.names]
            out |= {n for n in names if _layer(n) is not None} or {node.module}
    return out


def _violations(modules: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, imported in modules.items():
        own = _layer(mod)
        if own is None:
            continue
        for target in imported:
            layer = _layer(target)
            if layer is not None and layer > own:
                bad.append(f"{mod} imports {target}")
    return sorted(bad)


FILES = [*CTR.rglob("*.py"), *(ROOT / "models").glob("*.py")]
MODULES = {_module_name(p): _imports(p) for p in FILES}


def test_every_module_is_in_a_layer() -> None:
    """A new module lands in one of the packages the layers name."""
    assert [m for m in MODULES if _layer(m) is None] == []


def test_dependencies_point_one_way() -> None:
    """No module imports a layer above its own (serving never imports bench, ship or cli)."""
    assert _violations(MODULES) == []


def test_the_walk_covers_the_package_roots_and_models() -> None:
    """ctr/__init__.py and every file of models/ are walked (ctr/__init__.py was skipped)."""
    assert {"ctr", "ctr.api", "models", "models.train", "models.data"} <= set(MODULES)
    assert MODULES["ctr"] == set()


def test_only_the_outer_shell_imports_models() -> None:
    """Training, data generation and evaluation (models/) sit above the serving layers: no
    module of ctr below bench/ship/cli imports them (model/store, model/provision and
    features/load did)."""
    bad = {m: sorted(t for t in imported if _ours(t) and t.startswith("models"))
           for m, imported in MODULES.items() if m.startswith("ctr.") and not m.startswith(SHELL)}  # fmt: skip
    assert {m: t for m, t in bad.items() if t} == {}
    assert _violations({"ctr.model.store": {"models.train"}}) == ["ctr.model.store imports models.train"]


def _loaded_after(code: str) -> list[str]:
    """The modules a fresh interpreter holds after running `code` (sorted, one per line)."""
    probe = f"{code}\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    return out.stdout.split()


HEAVY = ("bentoml", "aiohttp", "starlette", "torch", "uvicorn")


def test_importing_the_settings_loads_no_server_stack() -> None:
    """`import ctr.settings` (training and the CLI do) loads no BentoML, aiohttp, Starlette or
    torch (ctr/__init__.py imported the whole serving path)."""
    loaded = _loaded_after("import ctr.settings")
    assert [m for m in loaded if m.split(".")[0] in HEAVY] == []


def test_ctr_serve_imports_nothing_from_bench() -> None:
    """`ctr serve` (down to the exec of the server) loads no ctr.bench module (it used
    ctr.bench.cluster, and ctr.cli.ship brought in ctr.bench through ctr.ship.smoke)."""
    code = """
from ctr.cli import main
try:
    main.main(["serve", "--service", "NoSuchService"])  # refused just before the exec
except SystemExit as exc:
    assert exc.code == 2, exc
"""
    assert [m for m in _loaded_after(code) if m.startswith("ctr.bench")] == []


def test_the_rule_catches_a_serving_module_importing_a_benchmark() -> None:
    """The walker sees a violation when there is one (guards against a test that cannot fail)."""
    assert _violations({"ctr.serving.gateway": {"ctr.bench.loadgen"}}) == [
        "ctr.serving.gateway imports ctr.bench.loadgen"
    ]
    assert _violations({"ctr.features.store": {"ctr.serving.gateway"}}) != []


@pytest.mark.parametrize("path", ["service.py", *(str(p.relative_to(ROOT)) for p in (ROOT / "models").glob("*.py"))])
def test_the_service_and_training_never_import_the_shell(path: str) -> None:
    """service.py and models/ (training) import no benchmark, shipping or CLI code."""
    assert [m for m in _imports(ROOT / path) if m.startswith(SHELL)] == []


def test_the_readme_package_map_names_packages_that_exist() -> None:
    """Every `ctr/<package>/` in the README's Architecture map is a package, and every package is in it."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Architecture") :]
    named = set(re.findall(r"^\| `ctr/([a-z_]+)/` \|", section, re.MULTILINE))
    packages = {p.parent.name for p in CTR.glob("*/__init__.py")}
    assert named == packages


def test_fastapi_is_an_extra_only_the_bench_peer_uses() -> None:
    """FastAPI is no runtime dependency: the `bench` extra, imported only inside the FastAPI peer."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("fastapi") for d in project["dependencies"])
    assert any(d.startswith("fastapi") for d in project["optional-dependencies"]["bench"])
    users = [p.relative_to(ROOT).as_posix() for p in CTR.rglob("*.py") if "fastapi" in p.read_text().lower()]
    assert sorted(users) == ["ctr/bench/e2e.py", "ctr/bench/peer.py"]
    src = (CTR / "bench" / "peer.py").read_text()
    assert "\nfrom fastapi" not in src.split("if TYPE_CHECKING:")[0]


def test_every_import_of_ours_resolves() -> None:
    """Each `ctr.*`/`models.*` import, also one inside a function (never run by the unit tests),
    names a module or attribute that exists: a merge once left two benchmarks importing a
    module the composition root had replaced."""
    import importlib
    import importlib.util

    missing = []
    for path in [*CTR.rglob("*.py"), *(ROOT / "models").rglob("*.py"), ROOT / "service.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                missing += [f"{path.name}: {a.name}" for a in node.names
                            if _ours(a.name) and importlib.util.find_spec(a.name) is None]  # fmt: skip
            elif isinstance(node, ast.ImportFrom) and node.module and _ours(node.module) and not node.level:
                if importlib.util.find_spec(node.module) is None:
                    missing.append(f"{path.name}: {node.module}")
                    continue
                module = importlib.import_module(node.module)
                missing += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                            if not hasattr(module, a.name)
                            and importlib.util.find_spec(f"{node.module}.{a.name}") is None]  # fmt: skip
    assert not missing
