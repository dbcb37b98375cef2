"""Which UNet modules carry experts, and how kohya's names map to ComfyUI's module paths. Host-free.

A *layer key* is a module path inside ComfyUI's model, `diffusion_model.<SGM path>`; a *kohya name* is
`lora_unet_` + a module path with dots as underscores, in SGM naming (`input_blocks_4_1_...`, used for SDXL)
or diffusers naming (`down_blocks_1_attentions_0_...`, used for SD1.5). Targets per spatial transformer
(SPEC.md section 2): attn1/attn2 to_q, to_k, to_v, to_out.0; ff.net.0.proj, ff.net.2 in every transformer
block, plus proj_in and proj_out.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from .errors import MismatchError

BLOCK_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                 "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
TRANSFORMER_TARGETS = ("proj_in", "proj_out")
TEXT_TOKEN_TARGETS = ("attn2.to_k", "attn2.to_v")  # these read the text context, not image positions
PREFIX = "diffusion_model."
KOHYA_PREFIX = "lora_unet_"


def reads_text_tokens(layer_key: str) -> bool:
    """True for layers whose tokens are the text context (attn2.to_k/to_v), not image positions."""
    return layer_key.endswith(TEXT_TOKEN_TARGETS)


def kohya_name(path: str) -> str:
    return KOHYA_PREFIX + path.replace(".", "_")


@dataclass(frozen=True)
class UNetLayout:
    """The parts of a UNet config that fix module paths (ComfyUI's unet_config keys of the same names)."""

    name: str
    num_res_blocks: tuple[int, ...]
    transformer_depth: tuple[int, ...]          # per input res block, in order
    transformer_depth_middle: int               # < 0: no middle transformer
    transformer_depth_output: tuple[int, ...]   # per output block, last block first (ComfyUI pops from the end)

    @classmethod
    def from_unet_config(cls, config: dict, name: str = "custom") -> "UNetLayout":
        middle = config.get("transformer_depth_middle")
        return cls(name, tuple(config["num_res_blocks"]), tuple(config["transformer_depth"]),
                   -1 if middle is None else int(middle), tuple(config["transformer_depth_output"]))

    def transformers(self) -> list[tuple[str, str, int]]:
        """(SGM path, diffusers path, depth) of every spatial transformer, in forward order."""
        out = []
        block, k = 1, 0
        for level, nrb in enumerate(self.num_res_blocks):
            for j in range(nrb):
                if self.transformer_depth[k] > 0:
                    out.append((f"input_blocks.{block}.1", f"down_blocks.{level}.attentions.{j}",
                                self.transformer_depth[k]))
                block, k = block + 1, k + 1
            if level < len(self.num_res_blocks) - 1:
                block += 1  # downsample
        if self.transformer_depth_middle >= 1:
            out.append(("middle_block.1", "mid_block.attentions.0", self.transformer_depth_middle))
        block, depth_output = 0, self.transformer_depth_output[::-1]
        for up, nrb in enumerate(reversed(self.num_res_blocks)):
            for j in range(nrb + 1):
                if depth_output[block] > 0:
                    out.append((f"output_blocks.{block}.1", f"up_blocks.{up}.attentions.{j}",
                                depth_output[block]))
                block += 1
        return out

    @cached_property
    def paths(self) -> dict[str, str]:
        """{layer key: diffusers-style module path} for every target module, in forward order."""
        out = {}
        for sgm, diffusers, depth in self.transformers():
            out[PREFIX + f"{sgm}.proj_in"] = f"{diffusers}.proj_in"
            for b in range(depth):
                for t in BLOCK_TARGETS:
                    out[PREFIX + f"{sgm}.transformer_blocks.{b}.{t}"] = f"{diffusers}.transformer_blocks.{b}.{t}"
            out[PREFIX + f"{sgm}.proj_out"] = f"{diffusers}.proj_out"
        return out

    @property
    def layer_keys(self) -> list[str]:
        return list(self.paths)

    @cached_property
    def name_map(self) -> dict[str, str]:
        """Every accepted spelling of a layer -> its layer key: kohya SGM, kohya diffusers, `diffusion_model.*`."""
        out = {}
        for key, diffusers in self.paths.items():
            out[key] = key
            out[kohya_name(key[len(PREFIX):])] = key
            out[kohya_name(diffusers)] = key
        return out

    def resolve(self, names, what: str) -> dict[str, str]:
        """{name: layer key} for names in any accepted spelling; MismatchError naming the strays otherwise."""
        unknown = [n for n in names if n not in self.name_map]
        if unknown:
            raise MismatchError(
                f"{what}: {len(unknown)} of {len(names)} layer names do not exist in a {self.name} UNet "
                f"(first: {', '.join(sorted(unknown)[:3])}). Is it made for another base model (SD1.5 vs SDXL)?")
        return {n: self.name_map[n] for n in names}


SD15 = UNetLayout("SD1.5", (2, 2, 2, 2), (1, 1, 1, 1, 1, 1, 0, 0), 1, (1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0))
SDXL = UNetLayout("SDXL", (2, 2, 2), (0, 0, 2, 2, 10, 10), 10, (0, 0, 0, 2, 2, 2, 10, 10, 10))
FAMILIES = (SD15, SDXL)


def detect_layout(names, what: str) -> UNetLayout:
    """The known family (SD1.5, SDXL) in which every name exists."""
    names = list(names)
    for layout in FAMILIES:
        if all(n in layout.name_map for n in names):
            return layout
    raise MismatchError(f"{what}: its layer names fit neither SD1.5 nor SDXL (first: {sorted(names)[:2]}); "
                        "pass the model's layout (UNetLayout.from_unet_config)")
