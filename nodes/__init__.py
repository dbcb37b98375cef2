"""ComfyUI nodes of MoLE (V3 schema). Imported only as a subpackage, never as top-level `nodes`."""
from comfy_api.latest import ComfyExtension, io

from .apply import ApplyMoLE, ExpertFixedScale
from .files import register_folder
from .loaders import LoadExperts, LoadGates, LoadPack, LoadSet
from .uncertainty import (EarlyEstimateModel, EnsembleFromExperts, EnsembleFromModels, UncertaintyReport,
                          UncertaintyScore)
from .visualise import GateCurves, GateMaps, ImageGrid, SaveTrace

NODES: list[type[io.ComfyNode]] = [LoadExperts, LoadGates, LoadPack, LoadSet, ApplyMoLE, ExpertFixedScale, GateMaps,
                                   GateCurves, SaveTrace, ImageGrid, EnsembleFromModels, EnsembleFromExperts,
                                   UncertaintyScore, EarlyEstimateModel, UncertaintyReport]


class MoLEExtension(ComfyExtension):
    async def on_load(self) -> None:
        register_folder()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        register_folder()
        return list(NODES)
