"""ComfyUI-MoLE: ComfyUI's entry point. It only registers; the nodes live in nodes/.

Importing this package imports nothing of ComfyUI, so `mole_ops` and the trainer can be used without a host.
"""


async def comfy_entrypoint():
    from .nodes import MoLEExtension

    return MoLEExtension()


# The frontend extension (web/mole.js): each MoLE node's summary and warnings drawn on the node, a toast per run
# with warnings. ComfyUI serves every .js file of this folder to the browser.
WEB_DIRECTORY = "./web"
