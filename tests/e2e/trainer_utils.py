"""Helpers of the trainer tests: a validated training config on the detectable checkpoint, and a Run."""
from comfyui_mole.trainer.training.config import TrainConfig, validate


def make_config(detectable, images, out, stage, **kw) -> TrainConfig:
    kw = {"output_name": stage, "train_batch_size": 4, "learning_rate": 1e-3, "cache_latents": True, **kw}
    c = TrainConfig(stage=stage, pretrained_model_name_or_path=str(detectable), train_data_dir=str(images),
                    resolution="64", output_dir=str(out), **kw)
    validate(c)
    return c


def run(config):
    from comfyui_mole.trainer.training.loop import Run

    return Run(config)


def held_out(r, seed: int = 1234) -> float:
    """The held-out loss (training/evaluation.py) of a run's training pictures, each once, at the dataset's size:
    comparable before and after `r.train()`."""
    from comfyui_mole.trainer.training.evaluation import held_out_loss

    d = r.plan.datasets[0]
    pictures = {path: caption for path, caption, _ in d.items}
    return held_out_loss(r.base, list(pictures.items()), seed, size=d.resolution)
