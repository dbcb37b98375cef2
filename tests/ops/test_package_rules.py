"""The package's import rules (STYLE.md 1 and the trainer's layout), read from the source with ast."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imports(path: Path) -> list[tuple[int, str]]:
    """(relative level, module) of every import in a file; absolute imports have level 0."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            found += [(node.level, node.module or "")] if node.module else \
                [(node.level, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
    return found


def test_training_imports_neither_the_demo_nor_the_harness_but_the_host_lookup():
    files = sorted((ROOT / "trainer" / "training").glob("*.py"))
    assert len(files) > 10
    for path in files:
        for level, module in imports(path):
            if level == 2:              # from ..x: a sibling package of training/
                assert module == "harness.host" or not module.startswith(("demo", "harness")), (path, module)


def test_mole_ops_never_imports_comfy_at_module_level_and_nothing_imports_nodes():
    for path in sorted((ROOT / "mole_ops").glob("*.py")):
        top = [n for n in ast.parse(path.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [a.name for n in top for a in n.names] + [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
        assert not any(name.split(".")[0] == "comfy" for name in names), path
    for folder in ("mole_ops", "trainer"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            assert not any(module.split(".")[0] == "nodes" and level for level, module in imports(path)), path


def test_no_function_of_the_training_loop_runs_past_60_lines():
    tree = ast.parse((ROOT / "trainer" / "training" / "loop.py").read_text())
    long = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60}
    assert not long, long


def test_the_registry_fields_point_at_files_of_this_repository():
    """pyproject's [tool.comfy] Icon is the raw URL of a picture in this repository (icon size), the Repository URL
    is set, and the version is written once (pyproject only)."""
    import tomllib

    from PIL import Image

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    repository = meta["project"]["urls"]["Repository"]
    icon = meta["tool"]["comfy"]["Icon"]
    assert repository.startswith("https://github.com/") and icon.startswith("https://raw.githubusercontent.com/")
    path = ROOT / icon.split("/main/", 1)[1]
    with Image.open(path) as im:
        assert im.size == (128, 128)
    version = meta["project"]["version"]
    hits = [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts and ".host" not in p.parts
            and version in p.read_text(errors="ignore")]
    assert hits == [], hits
