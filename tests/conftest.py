import pytest

from pixrun.config import load_config
from pixrun.losses.dino import DINO_HUB_ID

TINY_OVERRIDES = [
    "data.resolution=32",
    "model.width=32", "model.depth=2", "model.heads=2", "model.axes_dim=[8,8]",
    "model.patch_size=8", "model.bottleneck=16",
    "text.width=32", "text.depth=1", "text.heads=2",
    "train.batch_size=8", "train.log_every=1", "train.threads=1", "train.budget=", "optim.cooldown=0",
    "sample.steps=4", "sample.grid_seeds=1", "sample.grid_prompts=[a photo of a circle,a photo of a red square]",
    "eval.prompts_per_task=2", "eval.images_per_prompt=1", "eval.at_end=false",
    # the default's shapes teacher off, REPA back at the dataclass's settings (tests/test_shapes_teacher.py has it)
    "repa.weight=0", f"repa.teacher={DINO_HUB_ID}", "repa.projector=mlp", "repa.spatial_norm=false",
    "shapes_perceptual.weight=0",
]


@pytest.fixture
def tiny_config(tmp_path):
    """A config that trains in a second or two; `tiny_config(steps=..., **overrides)`."""

    def make(run="run", **overrides):
        extra = [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
        return load_config(None, [f"run_dir={tmp_path / run}", *TINY_OVERRIDES, *extra])

    return make
