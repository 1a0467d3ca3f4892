"""Model FLOPs per image of one training step, counted from the architecture.

Conventions, the usual ones for MFU:
- a multiply-add is 2 FLOPs, and only matmuls are counted: linear layers, convolutions and attention's two
  batched matmuls (q·kᵀ and scores·v). Norms, activations, softmax, RoPE, the loss arithmetic and the optimizer
  are left out; at the recipe's sizes they are well under 1 % of the matmuls' FLOPs, though not of their time.
- a network whose weights learn costs 3× its forward: the backward computes gradients to the inputs and to the
  weights, each as many FLOPs as the forward.
- a frozen network a loss differentiates through (LPIPS's VGG, P-DINO's ViT) runs forward on x̂₀ and on x₀ and
  backward to x̂₀ only, with no weight gradients: 3× one forward per image (forward + backward to the input of
  the x̂₀ branch cost 2×, the x₀ branch 1×).
- a frozen teacher that needs no gradient (REPA's DINO on x₀, a pretrained text encoder) costs 1× its forward.

The per-sample parts of the denoiser (timestep MLP, the blocks' adaLN modulation, the final adaLN) are counted
once per image, not per token: that is why the rule of thumb 6 · (block parameters) · tokens overstates PRX's
cost (`rule_of_thumb_training_flops`).
"""

from dataclasses import asdict, dataclass

from pixrun.model import ModelConfig, TokenRouting

TIMESTEP_EMBED_DIM = 256  # sinusoid width fed to time_in and to the resolution embedder


@dataclass
class ViTShape:
    """A plain ViT (DINOv2): patch embedding, `depth` pre-norm blocks, one CLS and `registers` extra tokens."""

    width: int = 768
    depth: int = 12
    mlp_dim: int = 3072
    patch: int = 14
    registers: int = 4


DINOV2_BASE_REGISTERS = ViTShape()  # facebook/dinov2-with-registers-base

# VGG16's conv layers up to relu5_3 (LPIPS's last tap): output channels, "M" = 2× max-pool.
VGG16_LPIPS_LAYERS = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
VGG16_LPIPS_TAPS = [64, 128, 256, 512, 512]  # channels of relu1_2 .. relu5_3, each scored by a 1x1 conv to 1


@dataclass
class T5Shape:
    d_model: int
    d_kv: int
    heads: int
    d_ff: int
    layers: int
    gated: bool


@dataclass
class FlopCount:
    """FLOPs per image of one training step, by part (see the module's conventions)."""

    denoiser_forward: float
    denoiser: float  # training: 3× forward
    text_encoder: float
    lpips: float
    pdino: float
    repa: float  # teacher forward + projector training

    @property
    def losses(self) -> float:
        return self.lpips + self.pdino + self.repa

    @property
    def total(self) -> float:
        return self.denoiser + self.text_encoder + self.losses

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "losses": self.losses, "total": self.total}


def linear(tokens: float, d_in: int, d_out: int) -> float:
    return 2.0 * tokens * d_in * d_out


def attention(queries: int, keys: int, width: int) -> float:
    """q·kᵀ and scores·v over all heads: each 2 · queries · keys · (heads · head_dim)."""
    return 2 * 2.0 * queries * keys * width


def tokens_at_block(model: ModelConfig, tokens: int, block: int, routing: TokenRouting | None) -> int:
    """Image tokens block `block` sees: all, or under TREAD in a routed block the kept ones (as Denoiser.plan_routing
    keeps them)."""
    if routing is None or not routing.enabled or block not in routing.blocks(model.depth):
        return tokens
    return tokens - int(routing.fraction * tokens)


def denoiser_forward_flops(
    model: ModelConfig, height: int, width: int, text_tokens: int, routing: TokenRouting | None = None
) -> float:
    """One image through the PRX denoiser; text padded to `text_tokens`; with TREAD, routed tokens skip blocks."""
    c = model
    w, hidden = c.width, int(c.width * c.mlp_ratio)
    tokens = (height // c.patch_size) * (width // c.patch_size)
    if c.bottleneck:
        flops = linear(tokens, c.patch_dim, c.bottleneck) + linear(tokens, c.bottleneck, w)
    else:
        flops = linear(tokens, c.patch_dim, w)
    flops += linear(text_tokens, c.context_dim, w)
    flops += linear(1, TIMESTEP_EMBED_DIM, w) + linear(1, w, w)
    if c.resolution_embeds:
        flops += linear(1, TIMESTEP_EMBED_DIM, w) + linear(1, w, w)
    for index in range(c.depth):
        n = tokens_at_block(c, tokens, index, routing)
        flops += linear(1, w, 6 * w)  # modulation, once per image
        flops += linear(n, w, 3 * w) + linear(text_tokens, w, 2 * w)  # image qkv, text kv
        flops += attention(n, text_tokens + n, w) + linear(n, w, w)
        flops += 3 * linear(n, w, hidden)  # gate, up, down
    flops += linear(1, w, 2 * w) + linear(tokens, w, c.patch_dim)  # final adaLN, final linear
    return flops


def rule_of_thumb_training_flops(model: ModelConfig, height: int, width: int, text_tokens: int) -> float:
    """RECIPE.md's estimate: 6 · (all block matmul parameters) · image tokens, plus attention at 3× forward."""
    w, hidden = model.width, int(model.width * model.mlp_ratio)
    tokens = (height // model.patch_size) * (width // model.patch_size)
    block_params = (3 + 1 + 2 + 6) * w * w + 3 * w * hidden  # qkv, out, text kv, modulation, MLP
    return 6.0 * model.depth * block_params * tokens + 3 * model.depth * attention(tokens, tokens + text_tokens, w)


def vgg16_lpips_forward_flops(size: int) -> float:
    """LPIPS (VGG) on one size×size image: VGG16's 3×3 convs up to relu5_3, plus the five 1x1 scoring convs."""
    flops, channels, side = 0.0, 3, size
    for layer in VGG16_LPIPS_LAYERS:
        if layer == "M":
            side //= 2
            continue
        flops += linear(side * side, 9 * channels, layer)
        channels = layer
    side = size
    for tap in VGG16_LPIPS_TAPS:
        flops += linear(side * side, tap, 1)
        side //= 2
    return flops


def vit_forward_flops(size: int, vit: ViTShape = DINOV2_BASE_REGISTERS) -> float:
    """One size×size image through a ViT: patch embedding, then (1 + registers + patches) tokens in every block."""
    patches = (size // vit.patch) ** 2
    tokens = 1 + vit.registers + patches
    w = vit.width
    flops = linear(patches, 3 * vit.patch**2, w)
    per_block = linear(tokens, w, 3 * w) + attention(tokens, tokens, w) + linear(tokens, w, w)
    per_block += linear(tokens, w, vit.mlp_dim) + linear(tokens, vit.mlp_dim, w)
    return flops + vit.depth * per_block


def t5_shape(hf_config) -> T5Shape | None:
    """The shape of a transformers T5 encoder from its config; None for other architectures."""
    if getattr(hf_config, "model_type", None) not in ("t5", "umt5", "mt5"):
        return None
    c = hf_config
    return T5Shape(c.d_model, c.d_kv, c.num_heads, c.d_ff, c.num_layers, c.is_gated_act)


def t5_encoder_forward_flops(t5: T5Shape, tokens: int) -> float:
    inner = t5.heads * t5.d_kv
    per_layer = linear(tokens, t5.d_model, 3 * inner) + attention(tokens, tokens, inner)
    per_layer += linear(tokens, inner, t5.d_model) + (3 if t5.gated else 2) * linear(tokens, t5.d_model, t5.d_ff)
    return t5.layers * per_layer


def repa_flops(
    model: ModelConfig, resolution: int, block: int, hidden: int, routing: TokenRouting | None, teacher: ViTShape
) -> float:
    """The frozen teacher on x₀, sized so its patch grid is the denoiser's token grid (1× forward), and the 3-layer
    projector, trained (3×), on the tokens that reached block `block`."""
    grid = resolution // model.patch_size
    teacher_flops = vit_forward_flops(grid * teacher.patch, teacher)
    n = tokens_at_block(model, grid * grid, block, routing)
    projector = linear(n, model.width, hidden) + linear(n, hidden, hidden) + linear(n, hidden, teacher.width)
    return teacher_flops + 3 * projector


def training_flops(
    model: ModelConfig,
    resolution: int,
    text_tokens: int,
    *,
    routing: TokenRouting | None = None,
    text_encoder: T5Shape | None = None,
    text_encoder_trained: bool = True,
    lpips_size: int | None = None,
    pdino_size: int | None = None,
    pdino_vit: ViTShape = DINOV2_BASE_REGISTERS,
    repa_block: int | None = None,
    repa_hidden: int = 2048,
    repa_teacher: ViTShape = DINOV2_BASE_REGISTERS,
) -> FlopCount:
    """FLOPs per image of one training step at resolution² px. A loss is counted when its size (or block) is given.

    lpips_size: the side LPIPS sees (the recipe downsamples ×0.5); pdino_size: 224 in the recipe; repa_block: the
    block whose output REPA aligns (7 in the recipe); text_encoder: None leaves the text tower uncounted.
    """
    forward = denoiser_forward_flops(model, resolution, resolution, text_tokens, routing)
    text = 0.0
    if text_encoder is not None:
        text = (3 if text_encoder_trained else 1) * t5_encoder_forward_flops(text_encoder, text_tokens)
    repa = 0.0
    if repa_block is not None:
        repa = repa_flops(model, resolution, repa_block, repa_hidden, routing, repa_teacher)
    return FlopCount(
        denoiser_forward=forward,
        denoiser=3 * forward,
        text_encoder=text,
        lpips=3 * vgg16_lpips_forward_flops(lpips_size) if lpips_size else 0.0,
        pdino=3 * vit_forward_flops(pdino_size, pdino_vit) if pdino_size else 0.0,
        repa=repa,
    )
