"""ComfyUI-MoLE: ComfyUI's entry point. It only registers; the nodes live in nodes/.

Importing this package imports nothing of ComfyUI, so `mole_ops` and the trainer can be used without a host.
"""


async def comfy_entrypoint():
    from .nodes import MoLEExtension

    return MoLEExtension()
