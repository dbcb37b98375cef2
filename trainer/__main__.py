"""`python -m trainer ...` from the repository root.

Run that way, this folder is imported as a top-level `trainer`, but its code uses relative imports within the
repository's package (as ComfyUI loads it), and the repository root on sys.path would shadow ComfyUI's own
top-level `nodes` module. So: drop the root from sys.path, load the repository as package `comfyui_mole`, run.
"""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
if "comfyui_mole" not in sys.modules:
    spec = importlib.util.spec_from_file_location("comfyui_mole", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_mole"] = package
    spec.loader.exec_module(package)

from comfyui_mole.trainer.cli import main  # noqa: E402

sys.exit(main(prog="python -m trainer"))
