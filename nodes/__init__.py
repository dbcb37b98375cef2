"""ComfyUI nodes of MoLE (V3 schema). Imported only as a subpackage, never as top-level `nodes`."""
from comfy_api.latest import ComfyExtension, io

NODES: list[type[io.ComfyNode]] = []


class MoLEExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
