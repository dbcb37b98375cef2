"""ImageReward scorer process: run by `python -m trainer evaluate` with the Python of the side environment that
scripts/imagereward-env.sh builds (ImageReward's model code needs timm 0.6 and transformers 4, which ComfyUI's
environment does not have). Only the standard library, torch, PIL and the image-reward package are imported here.

Protocol: arguments name the files; stdout gets one JSON object per line. First {"ready": true, ...} once the
model is loaded (or {"error": "..."} and exit code 2), then for every stdin line {"image": path, "prompt": text}
one line {"score": float} or {"error": "..."}. The score is ImageReward's own: the BLIP text encoder's [CLS]
feature after cross-attention to the image, through the reward MLP, standardised with the model's mean and std.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import types

# Keys of the official ImageReward.pt that scoring does not use (BLIP pre-training heads; buffers).
UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.itm_head.")


def import_imagereward():
    """ImageReward's model classes without its package __init__ (which imports the ReFL trainer: diffusers,
    accelerate, datasets) and without its CLIP/Aesthetic baselines (OpenAI's clip package)."""
    if "ImageReward" not in sys.modules:
        spec = importlib.util.find_spec("ImageReward")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("the image-reward package is not installed in this environment "
                              "(build it with scripts/imagereward-env.sh)")
        root = list(spec.submodule_search_locations)[0]
        for name, sub in (("ImageReward", ""), ("ImageReward.models", "models")):
            module = types.ModuleType(name)
            module.__path__ = [os.path.join(root, sub) if sub else root]
            sys.modules[name] = module
    from ImageReward import ImageReward as model_module
    from ImageReward.models.BLIP import blip_pretrain
    return model_module, blip_pretrain


def tokenizer_loader(path: str | None):
    """BLIP's init_tokenizer, reading bert-base-uncased from a local folder instead of the Hub."""
    from transformers import BertTokenizer

    def init_tokenizer():
        try:
            tokenizer = BertTokenizer.from_pretrained(path or "bert-base-uncased", local_files_only=True)
        except OSError as e:
            raise FileNotFoundError(f"BERT tokenizer {path or 'bert-base-uncased (Hugging Face cache)'}: {e}; "
                                    "give --imagereward_tokenizer, a folder with bert-base-uncased's vocab.txt")
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tokenizer.enc_token_id = tokenizer.additional_special_tokens_ids[0]
        return tokenizer
    return init_tokenizer


def load(checkpoint: str, med_config: str, tokenizer: str | None, device: str):
    import torch

    model_module, blip_pretrain = import_imagereward()
    blip_pretrain.init_tokenizer = tokenizer_loader(tokenizer)
    for path, flag in ((checkpoint, "--imagereward"), (med_config, "--imagereward_config")):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{flag} {path}: no such file")
    model = model_module.ImageReward(med_config=med_config, device=device)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--imagereward {checkpoint}: not an ImageReward state dict (a flat dict of tensors)")
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state and not k.endswith("position_ids")
                     and not k.startswith(UNUSED))
    unexpected = sorted(k for k in state if k not in own and not k.startswith(UNUSED))
    shapes = sorted(k for k in state if k in own and state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(f"--imagereward {checkpoint}: not ImageReward's layout for --imagereward_config "
                         f"{med_config}: {len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected "
                         f"{unexpected[:3]}, {len(shapes)} of another shape {shapes[:3]}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return model.to(device).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only import the model code (environment check)")
    parser.add_argument("--checkpoint")
    parser.add_argument("--med_config")
    parser.add_argument("--tokenizer")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.check:
        import_imagereward()
        return 0
    if not (args.checkpoint and args.med_config):
        parser.error("--checkpoint and --med_config are required")
    out = sys.stdout
    sys.stdout = sys.stderr                      # library prints must not mix with the protocol
    try:
        import torch
        from PIL import Image

        model = load(args.checkpoint, args.med_config, args.tokenizer, args.device)
    except Exception as e:  # noqa: BLE001 - reported to the parent as one line
        out.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
        out.flush()
        return 2
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        item = None
        try:
            item = json.loads(line)
            with torch.no_grad(), Image.open(item["image"]) as image:
                value = float(model.score(item["prompt"], image.convert("RGB")))
            reply = {"score": value}
        except Exception as e:  # noqa: BLE001
            reply = {"error": f"{item.get('image') if isinstance(item, dict) else line!r}: {type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
