"""The package's import rules (STYLE.md 1): the core and the package root never import ComfyUI."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("comfyui_mole", {init!r}, submodule_search_locations=[{root!r}])
pkg = importlib.util.module_from_spec(spec); sys.modules["comfyui_mole"] = pkg; spec.loader.exec_module(pkg)
import comfyui_mole.mole_ops
leaked = sorted(m for m in sys.modules if m == "comfy" or m.startswith(("comfy.", "comfy_api", "nodes", "folder_paths")))
print(",".join(leaked))
"""


def test_package_and_core_import_without_comfyui():
    code = PROBE.format(init=str(ROOT / "__init__.py"), root=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_repository_root_is_not_on_sys_path():
    # On sys.path, our nodes/ would shadow ComfyUI's top-level `nodes` module.
    assert all(Path(p or ".").resolve() != ROOT for p in sys.path)
