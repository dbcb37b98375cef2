"""Helpers of the trainer tests: a validated training config on the detectable checkpoint, and a Run."""
from comfyui_mole.trainer.config import TrainConfig, validate


def make_config(detectable, images, out, stage, **kw) -> TrainConfig:
    kw = {"output_name": stage, "train_batch_size": 4, "learning_rate": 1e-3, "cache_latents": True, **kw}
    c = TrainConfig(stage=stage, pretrained_model_name_or_path=str(detectable), train_data_dir=str(images),
                    resolution="64", output_dir=str(out), **kw)
    validate(c)
    return c


def run(config):
    from comfyui_mole.trainer.loop import Run

    return Run(config)
