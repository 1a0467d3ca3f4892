"""REPA: align a denoiser block's image tokens with a frozen teacher's patch tokens (Yu et al. 2024).

    loss = −mean over tokens n of cos(projector(h_n), f_n(x₀))

h is the output of `denoiser.blocks[block]` (the denoiser returns it with `hidden_at=block`), f the teacher's patch
tokens of the clean image resized so that the teacher's patch grid equals the denoiser's token grid (grid x the
teacher's patch: 14 for DINOv2, 16 for DINOv3, whatever the denoiser's patch). Under TREAD the block sees only the
kept tokens; `kept_index` picks the teacher tokens at the same positions.

`repa.teacher: shapes` takes the shapes world's own network instead (pixrun.losses.shapes_teacher), its last
feature map pooled to the token grid. iREPA (Singh et al. 2025) is two switches: `projector: conv` (one 3x3 conv
over the token grid instead of the MLP; it needs the whole grid, so not on a block TREAD routes) and
`spatial_norm` (the teacher's tokens centred and scaled per channel over each image's tokens).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pixrun.errors import ConfigError
from pixrun.losses import LossConfig, LossInputs, LossTerm, counted_flops, register_loss, shapes_teacher
from pixrun.losses.dino import DINO_HUB_ID, DinoFeatures, dino_config
from pixrun.losses.shapes_teacher import ShapesFeatures
from pixrun.model import ModelConfig, RoutePlan

SHAPES_TEACHER = "shapes"  # repa.teacher naming the shapes world's own network
PROJECTORS = ("mlp", "conv")


@dataclass
class REPAConfig(LossConfig):
    weight: float = 0.0  # λ; 0 switches it off; the recipe uses 0.5
    block: int = 7  # index into denoiser.blocks whose output is aligned (the recipe's "block 8")
    hidden: int = 2048  # the MLP projector's width (the conv projector has no hidden layer)
    # hub id or local directory of a DINOv2 (with or without registers) or DINOv3 ViT; "shapes": the shapes
    # world's own network, trained on first use and cached (pixrun.losses.shapes_teacher)
    teacher: str = DINO_HUB_ID
    random_init: bool = False  # a tiny random ViT teacher: tests / CPU demo only, results are meaningless
    projector: str = "mlp"  # "mlp": 3 SiLU layers per token; "conv": iREPA's one 3x3 conv over the token grid
    spatial_norm: bool = False  # iREPA: the teacher's tokens centred and scaled per channel over each image's tokens

    def validate(self) -> None:
        super().validate()
        if self.block < 0 or self.hidden < 1:
            raise ValueError("block must be >= 0 and hidden >= 1")
        if self.projector not in PROJECTORS:
            raise ValueError(f"projector must be one of {', '.join(PROJECTORS)}, got {self.projector!r}")

    def fits(self, model: ModelConfig) -> None:
        if self.block >= model.depth:
            raise ValueError(f"block {self.block} is not a block of a depth-{model.depth} model")


def load_teacher(config: REPAConfig) -> DinoFeatures | ShapesFeatures:
    config.validate()
    if config.teacher == SHAPES_TEACHER:
        return shapes_teacher.load_teacher()[0]
    return DinoFeatures.load(config.teacher, config.random_init, "repa.teacher", "repa.random_init")


def spatial_norm(tokens: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """iREPA's spatial normalisation: (B, N, D) tokens centred and scaled to unit variance per channel over the
    N tokens of each image, so that what is aligned is how tokens differ across the image, not what they share."""
    centred = tokens - tokens.mean(1, keepdim=True)
    return centred / (centred.pow(2).mean(1, keepdim=True) + eps).sqrt()


class REPA(nn.Module):
    """The trainable part, from the denoiser's width to the teacher's token width: a 3-layer SiLU MLP per token, or
    (`kind="conv"`, iREPA) one 3x3 conv over the token grid, which sees each token's neighbours."""

    def __init__(self, width: int, teacher_dim: int, hidden: int = 2048, kind: str = "mlp"):
        super().__init__()
        self.kind = kind
        if kind == "conv":
            self.projector = nn.Conv2d(width, teacher_dim, 3, padding=1)
        else:
            self.projector = nn.Sequential(
                nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                nn.Linear(hidden, teacher_dim)
            )

    def forward(
        self, tokens: torch.Tensor, teacher_tokens: torch.Tensor, kept_index: torch.Tensor | None = None,
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """tokens (B, N_kept, width) from the block; teacher_tokens (B, N, D) on the full grid in raster order;
        kept_index (B, N_kept) the grid positions of `tokens` (None: all N, in order); grid (rows, columns) of
        the N tokens, needed by the conv projector, which takes all N only. Returns (B,) −cos means."""
        if self.kind == "conv":
            if kept_index is not None:
                raise ConfigError("repa.projector conv needs the whole token grid, and TREAD routes block repa.block:"
                                  " align a block outside tread.start..tread.end, or use repa.projector=mlp")
            image = tokens.transpose(1, 2).unflatten(2, grid)
            projected = self.projector(image.to(self.projector.weight.dtype)).flatten(2).transpose(1, 2)
        else:
            if kept_index is not None:
                teacher_tokens = teacher_tokens.gather(
                    1, kept_index[..., None].expand(-1, -1, teacher_tokens.shape[-1]))
            projected = self.projector(tokens)
        return -F.cosine_similarity(projected.float(), teacher_tokens.float(), dim=-1).mean(1)


@register_loss
class REPATerm(LossTerm):
    """REPA per sample on the output of block `repa.block`, against the teacher's tokens of the real image at the
    denoiser's token grid; under TREAD, on the tokens the block kept. Its projector trains with the model."""

    name = "repa"
    config_class = REPAConfig

    def __init__(self, config: REPAConfig, teacher: DinoFeatures | ShapesFeatures, projector: REPA):
        super().__init__(config)
        self.teacher, self.projector = teacher, projector

    @classmethod
    def build(cls, config: REPAConfig, width: int, device: torch.device, shared: dict) -> "REPATerm":
        key = ("shapes",) if config.teacher == SHAPES_TEACHER else ("dino", config.teacher, config.random_init)
        if key not in shared:
            shared[key] = load_teacher(config).to(device)
        teacher = shared[key]
        return cls(config, teacher, REPA(width, teacher.dim, config.hidden, config.projector).to(device))

    def hidden_block(self) -> int:
        return self.config.block

    def trainable(self) -> dict[str, nn.Module]:
        return {"repa_projector": self.projector}

    def __call__(self, inputs: LossInputs) -> torch.Tensor:
        x0, patch = inputs.images, inputs.pixels_per_token
        grid = (x0.shape[-2] // patch, x0.shape[-1] // patch)
        with torch.no_grad():
            target = self.teacher.grid_tokens(x0, grid)
            if self.config.spatial_norm:
                target = spatial_norm(target.float())
        kept = inputs.routing.tokens_at(self.config.block) if inputs.routing is not None else None
        return self.projector(inputs.hidden, target, kept, grid)

    @classmethod
    def flops(cls, config: REPAConfig, model: ModelConfig, resolution: int, grid: int,
              routing: RoutePlan | None) -> int:
        """The teacher on x₀ at the denoiser's token grid, forward only, and the projector trained on the tokens
        that reached block `repa.block` (all of them, or TREAD's kept ones)."""
        kept = routing.tokens_at(config.block) if routing is not None else None
        with torch.device("meta"):
            if config.teacher == SHAPES_TEACHER:
                spec = shapes_teacher.DEFAULT_SPEC
                teacher = ShapesFeatures(spec.widths, spec.resolution)
            else:
                teacher = DinoFeatures.from_config(dino_config(config.teacher, config.random_init, "repa.teacher",
                                                               "repa.random_init"))
            projector = REPA(model.width, teacher.dim, config.hidden, config.projector)
            x0 = torch.empty(1, 3, resolution, resolution)
            tokens = torch.empty(1, grid * grid if kept is None else kept.shape[1], model.width, requires_grad=True)

        def step():
            with torch.no_grad():
                target = teacher.grid_tokens(x0, (grid, grid))
                if config.spatial_norm:
                    target = spatial_norm(target)
            projector(tokens, target, kept, (grid, grid)).sum().backward()

        return counted_flops(step)
