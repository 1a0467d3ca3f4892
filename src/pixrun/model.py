"""The denoiser: PRX's transformer in pixel space.

Image patches are the queries of every block; keys and values are [text ; image]. Text enters once through
`txt_in`; each block has its own text K/V projection. Conditioning on t (and optionally resolution) goes through
adaLN modulation. Parameter names and shapes follow diffusers' `PRXTransformer2DModel`, so a trained state dict
loads there unchanged.

What does not change from block to block is made once per forward: the text padding mask, as an additive bias in
the form the fused attention kernels take (None when nothing is padded, so CUDA's flash kernel can run), and RoPE's
cos and sin, which are cached per grid size and device.

TREAD (token routing): given a `RoutePlan`, only the image tokens in `plan.kept_index` go through the blocks in
`plan.blocks`; the others skip them and are put back at their own positions after the last of them. So block i puts
out (B, N_kept, width) hidden states, ordered as `plan.kept_index`, for i in `plan.blocks`, and all (B, N, width)
image tokens for every other block (`plan.tokens_at(i)` says which); `hidden_at=i` returns them for REPA.

SPRINT (`tread.fusion: sprint`, Park et al. 2025): after the routed span, the tokens are not simply put back but
fused by a linear layer over [dense ; deep] (`SprintFusion`): dense = the span's input, all tokens; deep = its
output, the kept tokens at their positions and the dropped ones as they skipped it plus a learnt mask token. The
layer starts as [0 ; I], so a fresh fusion gives exactly TREAD's re-insertion. It runs in the dense forward too
(there deep is every token's output), as SPRINT's model does at inference; the diffusers model has no such layer.

Pixel head (`model.pixel_head: C`): after unpatchify, three 3x3 convolutions of C channels over [x̂ ; x_t ; t] add a
correction to x̂ at full resolution (`PixelHead`), starting at zero. Also pixrun's own: such a run does not export.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelConfig:
    width: int = 256
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 3.5
    patch_size: int = 16
    bottleneck: int | None = 128  # None: a single Linear(patch_dim -> width)
    in_channels: int = 3
    context_dim: int = 256  # width of the text tower's output
    axes_dim: list[int] = field(default_factory=lambda: [32, 32])  # RoPE dims for (row, col); sum = head dim
    rope_theta: float = 10000.0
    time_factor: float = 1000.0
    time_max_period: float = 10000.0
    resolution_embeds: bool = False
    # > 0: a pixel-space head of that many channels over the unpatchified output (PixelHead); not in diffusers' model
    pixel_head: int = 0

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch_size**2

    def validate(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"model.width {self.width} is not divisible by model.heads {self.heads}")
        if self.pixel_head < 0:
            raise ValueError(f"model.pixel_head must be 0 (none) or a number of channels, got {self.pixel_head}")
        if sum(self.axes_dim) != self.head_dim or any(d % 2 for d in self.axes_dim):
            raise ValueError(
                f"model.axes_dim {self.axes_dim} must be even numbers summing to the head dim {self.head_dim}"
            )


PRESETS: dict[str, ModelConfig] = {
    # CPU-sized: 64 px images in 16-px patches, i.e. 16 tokens of 768 values each. Narrow (128) because on 2 CPU
    # cores a 12-minute budget buys ~3x the steps of width 256, and steps are what it lacks (docs/speedrun.md).
    "shapes-cpu": ModelConfig(width=128, heads=2),
    # PRX "small", pixel variant of the 24-hour speedrun: about 1.2 B parameters.
    "prx-small-pixel": ModelConfig(
        width=1792, depth=16, heads=28, mlp_ratio=3.5, patch_size=32, bottleneck=256, context_dim=2304
    ),
}


@dataclass
class TokenRouting:
    """TREAD: a random `fraction` of image tokens per sample skips `blocks[start:end]` (a Python slice, so end < 0
    counts from the last block). The recipe routes 50 % from block 2 (index 1) up to the penultimate block."""

    enabled: bool = False  # read by the trainer: plan a routing per step, or not
    fraction: float = 0.5
    start: int = 1
    end: int = -1
    fusion: str = "tread"  # tread: the routed tokens rejoin unchanged; sprint: SPRINT's fusion layer (model.py)

    def blocks(self, depth: int) -> range:
        """The routed blocks of a depth-`depth` model; raises ValueError on a bad setting."""
        routed = range(depth)[self.start:self.end]
        if not 0 <= self.fraction < 1:
            raise ValueError(f"tread.fraction must be in [0, 1), got {self.fraction}")
        if self.fusion not in ("tread", "sprint"):
            raise ValueError(f"tread.fusion must be tread or sprint, got {self.fusion!r}")
        if not routed:
            raise ValueError(f"tread.start {self.start}, tread.end {self.end} select no block of a depth-{depth} model")
        return routed

    def sprint_span(self, depth: int) -> range | None:
        """The blocks after which SPRINT fuses (the routed ones), or None without SPRINT's fusion."""
        return self.blocks(depth) if self.fusion == "sprint" else None


@dataclass
class RoutePlan:
    """Which image tokens go through the routed blocks: `kept_index` (B, N_kept), sorted, distinct per sample."""

    kept_index: torch.Tensor
    blocks: range

    def tokens_at(self, block: int) -> torch.Tensor | None:
        """The image tokens block `block` sees: `kept_index`, or None for all of them."""
        return self.kept_index if block in self.blocks else None


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float, scale: float = 1.0) -> torch.Tensor:
    """Sinusoidal embedding in (cos, sin) order."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = scale * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def rope_angles(grid_h: int, grid_w: int, axes_dim: list[int], theta: float, device) -> torch.Tensor:
    """Rotation angles (tokens, head_dim / 2) in float64 for a row-major grid: first axis = row, second = column."""
    rows = torch.arange(grid_h, device=device, dtype=torch.float64).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, device=device, dtype=torch.float64).repeat(grid_h)
    parts = []
    for pos, dim in zip((rows, cols), axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
        parts.append(pos[:, None] * omega[None])
    return torch.cat(parts, dim=-1)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of the last dim by the angles whose (cos, sin) is `rope`."""
    cos, sin = rope
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    return torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1).flatten(-2).type_as(x)


def attention_bias(txt_mask: torch.Tensor | None, num_img: int, dtype: torch.dtype) -> torch.Tensor | None:
    """The text padding mask as an additive bias over the keys [text ; image]: -inf at padded text tokens, 0 elsewhere,
    shape (B, 1, 1, L_txt + num_img). None for no mask: every key is visible.

    Each row is allocated to a multiple of 8 elements, the stride CUDA's memory-efficient kernel needs (it would
    otherwise pad a copy in every block); a block that sees fewer image tokens (TREAD) takes a prefix of it."""
    if txt_mask is None:
        return None
    b, l_txt = txt_mask.shape
    keys = l_txt + num_img
    bias = torch.zeros(b, 1, 1, -(-keys // 8) * 8, dtype=dtype, device=txt_mask.device)[..., :keys]
    bias[..., :l_txt].masked_fill_(~txt_mask.bool()[:, None, None, :], float("-inf"))
    return bias


def patchify(img: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C*p*p), channel-major inside a patch."""
    b, c, h, w = img.shape
    return img.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(seq: torch.Tensor, p: int, h: int, w: int) -> torch.Tensor:
    b, _, d = seq.shape
    c = d // (p * p)
    return seq.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, dim)
        self.out_layer = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.RMSNorm):
    """Computed in fp32 also under bf16 autocast, as diffusers' RMSNorm does. The weight goes up to fp32 too (FSDP2
    gathers it in bf16): with mismatched dtypes torch falls back from its fused kernel to a composite one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.normalized_shape, self.weight.float(), self.eps).type_as(x)


class Attention(nn.Module):
    """Image queries attend to [text ; image] keys; RoPE on image q/k only, QK RMSNorm."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        head_dim = width // heads
        self.img_qkv_proj = nn.Linear(width, 3 * width, bias=False)
        self.norm_q = RMSNorm(head_dim, eps=1e-6)
        self.norm_k = RMSNorm(head_dim, eps=1e-6)
        self.txt_kv_proj = nn.Linear(width, 2 * width, bias=False)
        self.norm_added_k = RMSNorm(head_dim, eps=1e-6)
        self.to_out = nn.ModuleList([nn.Linear(width, width, bias=False)])

    def forward(self, img, txt, rope, attn_bias):
        b, n_img, _ = img.shape
        q, k, v = self.img_qkv_proj(img).view(b, n_img, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(self.norm_q(q), rope), apply_rope(self.norm_k(k), rope)
        txt_k, txt_v = self.txt_kv_proj(txt).view(b, txt.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        k = torch.cat([self.norm_added_k(txt_k), k], dim=2)
        v = torch.cat([txt_v, v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)
        return self.to_out[0](out.transpose(1, 2).reshape(b, n_img, -1))


class Modulation(nn.Module):
    """adaLN: (shift, scale, gate) for attention and for the MLP, zero-initialised so blocks start as identity."""

    def __init__(self, width: int):
        super().__init__()
        self.lin = nn.Linear(width, 6 * width)

    def forward(self, vec: torch.Tensor):
        return self.lin(F.silu(vec))[:, None, :].chunk(6, dim=-1)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.img_pre_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attention = Attention(width, heads)
        self.post_attention_layernorm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)
        self.modulation = Modulation(width)

    def forward(self, img, txt, vec, rope, attn_bias):
        attn_shift, attn_scale, attn_gate, mlp_shift, mlp_scale, mlp_gate = self.modulation(vec)
        x = (1 + attn_scale) * self.img_pre_norm(img) + attn_shift
        img = img + attn_gate * self.attention(x, txt, rope, attn_bias)
        x = (1 + mlp_scale) * self.post_attention_layernorm(img) + mlp_shift
        return img + mlp_gate * self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=-1)
        return self.linear((1 + scale[:, None]) * self.norm_final(x) + shift[:, None])


class SprintFusion(nn.Module):
    """SPRINT's sparse-dense fusion: one linear layer over [dense ; deep], and the mask token that marks the tokens
    that skipped the routed span."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(2 * width, width)
        self.mask_token = nn.Parameter(torch.zeros(width))

    def reset_parameters(self) -> None:
        """[0 ; I]: the fused tokens start as the deep ones, i.e. as TREAD puts them back."""
        width = self.mask_token.shape[0]
        with torch.no_grad():
            self.linear.weight.copy_(torch.cat([torch.zeros(width, width), torch.eye(width)], dim=1))
            self.linear.bias.zero_()
            self.mask_token.zero_()

    def forward(self, dense: torch.Tensor, deep: torch.Tensor, kept_index: torch.Tensor | None) -> torch.Tensor:
        """dense (B, N, width): the span's input; deep: its output, (B, N_kept, width) at `kept_index`, or all N
        (kept_index None: nothing was dropped). Returns the (B, N, width) fused tokens."""
        if kept_index is not None:
            index = kept_index[:, :, None].expand(-1, -1, deep.shape[-1])
            deep = (dense + self.mask_token.to(dense.dtype)).scatter(1, index, deep.to(dense.dtype))
        return self.linear(torch.cat([dense, deep], dim=-1))


class PixelHead(nn.Module):
    """Three 3x3 convolutions over the whole image, after the final layer has written each patch on its own: they see
    across patch borders (the seams) and the noisy input's own pixels, which the patch embedding squeezes through
    its bottleneck. Input [x̂ ; x_t ; t] per pixel; the output is added to x̂, and the last convolution starts at
    zero, so a fresh head leaves the transformer's prediction unchanged (as PixelDiT's and DeCo's pixel decoders
    refine a patch transformer's output at full resolution)."""

    def __init__(self, channels: int, image_channels: int):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(2 * image_channels + 1, channels, 3, padding=1), nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU(),
            nn.Conv2d(channels, image_channels, 3, padding=1),
        )

    def reset_parameters(self) -> None:
        for conv in self.convs:
            if isinstance(conv, nn.Conv2d):
                conv.reset_parameters()
        nn.init.zeros_(self.convs[-1].weight)
        nn.init.zeros_(self.convs[-1].bias)

    def forward(self, coarse: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t_plane = t.to(coarse.dtype)[:, None, None, None].expand(-1, 1, *coarse.shape[2:])
        return coarse + self.convs(torch.cat([coarse, x.to(coarse.dtype), t_plane], dim=1))


class ResolutionEmbedder(nn.Module):
    def __init__(self, width: int, max_period: float):
        super().__init__()
        self.max_period = max_period
        self.mlp = MLPEmbedder(256, width)

    def forward(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        emb = torch.cat([timestep_embedding(h, 128, self.max_period), timestep_embedding(w, 128, self.max_period)], -1)
        return self.mlp(emb)


class Denoiser(nn.Module):
    def __init__(self, config: ModelConfig, sprint_span: range | None = None):
        """`sprint_span`: the routed blocks after which SPRINT's fusion runs (`TokenRouting.sprint_span`); None:
        no fusion layer, the parameters are diffusers' name for name."""
        super().__init__()
        config.validate()
        self.config = c = config
        if c.bottleneck:
            self.img_in = nn.Sequential(nn.Linear(c.patch_dim, c.bottleneck), nn.Linear(c.bottleneck, c.width))
        else:
            self.img_in = nn.Linear(c.patch_dim, c.width)
        self.time_in = MLPEmbedder(256, c.width)
        self.txt_in = nn.Linear(c.context_dim, c.width)
        self.resolution_embedder = ResolutionEmbedder(c.width, c.time_max_period) if c.resolution_embeds else None
        self.blocks = nn.ModuleList([Block(c.width, c.heads, c.mlp_ratio) for _ in range(c.depth)])
        self.sprint_span = sprint_span
        self.sprint_fusion = SprintFusion(c.width) if sprint_span is not None else None
        self.final_layer = FinalLayer(c.width, c.patch_dim)
        self.pixel_head = PixelHead(c.pixel_head, c.in_channels) if c.pixel_head else None
        # RoPE's (cos, sin) by (grid_h, grid_w, device): a plain dict, so not in the state dict
        self.rope_cache: dict[tuple[int, int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        zero_init = [block.modulation.lin for block in self.blocks] + [self.final_layer.linear]
        zero_init.append(self.final_layer.adaLN_modulation[1])
        for linear in zero_init:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        if self.sprint_fusion is not None:
            self.sprint_fusion.reset_parameters()
        if self.pixel_head is not None:
            self.pixel_head.reset_parameters()

    def plan_routing(
        self, routing: TokenRouting, num_tokens: int, generators: list[torch.Generator], device
    ) -> RoutePlan:
        """Draw sample i's kept tokens (uniformly, without replacement) on `device` from `generators[i]` alone, so a
        sample routes the same whichever batch, rank or world size it is in. The trainer seeds them from the step
        and the sample, so a resumed run routes exactly as before; sampling seeds them afresh, so its routed
        prediction is deterministic."""
        blocks = routing.blocks(self.config.depth)
        kept = num_tokens - int(routing.fraction * num_tokens)
        scores = torch.stack([torch.rand(num_tokens, generator=g, device=device) for g in generators])
        kept_index = scores.argsort(dim=1)[:, :kept].sort(dim=1).values
        return RoutePlan(kept_index, blocks)

    def rope(self, grid_h: int, grid_w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of the RoPE angles, (tokens, head_dim / 2) in fp32: computed once per grid and device."""
        key = (grid_h, grid_w, device)
        if key not in self.rope_cache:
            angles = rope_angles(grid_h, grid_w, self.config.axes_dim, self.config.rope_theta, device)
            self.rope_cache[key] = (angles.cos().float(), angles.sin().float())
        return self.rope_cache[key]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        txt: torch.Tensor,
        txt_mask: torch.Tensor | None = None,
        routing: RoutePlan | None = None,
        hidden_at: int | None = None,
        stop_at_hidden: bool = False,
    ):
        """x: (B, C, H, W) noisy image; t: (B,) in [0, 1], 1 = pure noise; txt: (B, L, context_dim).
        txt_mask: (B, L) True at real text tokens; pass None when no token is padded (the fused kernels then run
        without a mask). routing: None runs every token through every block; else TREAD with that plan.
        hidden_at: also return the image tokens block `hidden_at` put out (REPA aligns them), as (x̂, hidden);
        under routing, the block's own tokens (`routing.tokens_at(hidden_at)` says which).
        stop_at_hidden: return only block `hidden_at`'s tokens and run no block after it (a teacher's features:
        the self-alignment loss runs the EMA denoiser so); dense only. Through `forward`, so FSDP's hooks run."""
        c = self.config
        b, _, h, w = x.shape
        img = self.img_in(patchify(x, c.patch_size))
        txt = self.txt_in(txt)
        rope = self.rope(h // c.patch_size, w // c.patch_size, x.device)
        attn_bias = attention_bias(txt_mask, img.shape[1], img.dtype)
        vec = self.time_in(timestep_embedding(t, 256, c.time_max_period, c.time_factor).to(img.dtype))
        if self.resolution_embedder is not None:
            vec = vec + self.resolution_embedder(x.new_full((b,), h), x.new_full((b,), w))
        hidden = None
        if stop_at_hidden and (hidden_at is None or routing is not None):
            raise ValueError("stop_at_hidden needs hidden_at and a dense forward (routing=None)")
        if routing is None:
            for i, block in enumerate(self.blocks[: hidden_at + 1] if stop_at_hidden else self.blocks):
                if self.sprint_span is not None and i == self.sprint_span.start:
                    dense = img
                img = block(img, txt, vec, rope, attn_bias)
                hidden = img if i == hidden_at else hidden
                if self.sprint_span is not None and i == self.sprint_span.stop - 1:
                    img = self.sprint_fusion(dense, img, None)
            if stop_at_hidden:
                return hidden
        else:
            img, hidden = self.routed_blocks(img, txt, vec, rope, attn_bias, routing, hidden_at)
        out = unpatchify(self.final_layer(img, vec), c.patch_size, h, w)
        if self.pixel_head is not None:
            out = self.pixel_head(out, x, t)
        return out if hidden_at is None else (out, hidden)

    def routed_blocks(self, img, txt, vec, rope, attn_bias, plan: RoutePlan,
                      hidden_at: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.sprint_span is not None and plan.blocks != self.sprint_span:
            raise ValueError(f"the plan routes blocks {plan.blocks}, but SPRINT fuses after {self.sprint_span}")
        index = plan.kept_index[:, :, None].expand(-1, -1, img.shape[-1])
        # (B, 1, N_kept, head_dim / 2): RoPE of the kept tokens' positions
        kept_rope = tuple(part[plan.kept_index][:, None] for part in rope)
        kept_bias = None if attn_bias is None else attn_bias[..., : txt.shape[1] + plan.kept_index.shape[1]]
        hidden = None
        for i, block in enumerate(self.blocks):
            if i == plan.blocks.start:
                all_tokens, img = img, img.gather(1, index)
            routed = i in plan.blocks
            img = block(img, txt, vec, kept_rope if routed else rope, kept_bias if routed else attn_bias)
            hidden = img if i == hidden_at else hidden
            if i == plan.blocks.stop - 1 and self.sprint_fusion is not None:
                img = self.sprint_fusion(all_tokens, img, plan.kept_index)
            elif i == plan.blocks.stop - 1:
                img = all_tokens.scatter(1, index, img.to(all_tokens.dtype))
        return img, hidden


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
