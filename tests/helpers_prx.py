"""Tiny diffusers PRX pipelines, randomly initialised and saved with save_pretrained, as the hub holds the released
ones: a PRXPipeline (T5Gemma's encoder, optionally a Flux-like AutoencoderKL) and a PRXPixelPipeline (Qwen3-VL's
text model). Tests load them by path through the code a user runs with a hub id.

Their tokenizers are character-level BPEs built offline, each of the family's kind and padding side: Gemma's pads
on the left and starts every prompt with <bos>, as Gemma's does; Qwen's pads on the right and gives the empty prompt
no token at all."""

import string
from pathlib import Path

import torch
import transformers

TEXT_DIM = 16
TOKENS = 16  # the tokenizers' model_max_length (PRXPipeline's token budget) and PRXPixelPipeline's prompt_max_tokens
TINY_DECODER = {
    "hidden_size": TEXT_DIM, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 1, "head_dim": 8,
}
SAMPLE_SIZE = 32  # default_sample_size, in pixels: not a binned resolution, so call with use_resolution_binning=False


def char_vocab(specials: list[str]) -> dict[str, int]:
    """A character-level BPE vocabulary (no merges) with the byte-level and sentencepiece space markers."""
    vocab = {s: i for i, s in enumerate(specials)}
    for c in sorted(string.ascii_lowercase + string.digits + ".,'-") + ["Ġ", "▁"]:
        vocab.setdefault(c, len(vocab))
    return vocab


def gemma_tokenizer() -> transformers.PreTrainedTokenizerBase:
    vocab = char_vocab(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])
    return transformers.GemmaTokenizer(vocab=vocab, merges=[], model_max_length=TOKENS, add_bos_token=True)


def qwen_tokenizer() -> transformers.PreTrainedTokenizerBase:
    return transformers.Qwen2Tokenizer(vocab=char_vocab(["<|endoftext|>"]), merges=[])


def t5gemma_encoder(vocab_size: int) -> torch.nn.Module:
    """What PRXPipeline's text_encoder is: transformers' T5GemmaEncoder (T5Gemma's encoder alone), saved under the
    whole model's T5GemmaConfig, the form diffusers' PRX loader reads (it builds the encoder from `config.encoder`)."""
    from transformers.models.t5gemma.modeling_t5gemma import T5GemmaEncoder

    encoder, decoder = (transformers.T5GemmaModuleConfig(vocab_size=vocab_size, **TINY_DECODER) for _ in range(2))
    config = transformers.T5GemmaConfig(encoder=encoder, decoder=decoder, is_encoder_decoder=False,
                                        vocab_size=vocab_size)
    model = T5GemmaEncoder(config.encoder)
    model.config = config
    return model


def qwen3_vl_text_config(vocab_size: int) -> transformers.Qwen3VLTextConfig:
    # mrope_section splits head_dim / 2 rotary frequencies between time, height and width
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "mrope_interleaved": True}
    return transformers.Qwen3VLTextConfig(vocab_size=vocab_size, rope_parameters=rope, **TINY_DECODER)


def qwen3_vl(vocab_size: int) -> transformers.Qwen3VLForConditionalGeneration:
    """A whole Qwen3-VL (vision tower and LM head included), as the hub holds Qwen/Qwen3-VL-*-Instruct."""
    vision = transformers.Qwen3VLVisionConfig(
        depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=TEXT_DIM, patch_size=4,
        spatial_merge_size=1, temporal_patch_size=1, num_position_embeddings=16, deepstack_visual_indexes=[0],
    )
    config = transformers.Qwen3VLConfig(text_config=qwen3_vl_text_config(vocab_size).to_dict(),
                                        vision_config=vision.to_dict())
    return transformers.Qwen3VLForConditionalGeneration(config)


def tiny_transformer(in_channels: int, patch_size: int, pixel: bool):
    from diffusers import PRXTransformer2DModel

    # head dim 16 = the two rotary axes' 8 each; PRXPixel's bottleneck patch embedding and resolution embedding
    pixel_only = {"bottleneck_size": 16, "resolution_embeds": True} if pixel else {}
    return PRXTransformer2DModel(
        in_channels=in_channels, patch_size=patch_size, context_in_dim=TEXT_DIM, hidden_size=32, mlp_ratio=2.0,
        num_heads=2, depth=2, axes_dim=[8, 8], **pixel_only,
    )


def tiny_vae():
    """A Flux-like AutoencoderKL at toy size: 2x spatial compression, 4 latent channels, Flux's shift and scale."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
        norm_num_groups=8, sample_size=SAMPLE_SIZE, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    )


def tiny_prx_pipeline(path, vae: bool) -> Path:
    """A PRXPipeline saved to `path`: latent transformer (4 channels, patch 2), T5Gemma encoder, Gemma tokenizer,
    the scheduler's shift 3 (convert_prx_to_diffusers.py's), and the tiny VAE when `vae` (else none: PRXPipeline
    then gives latents only)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, PRXPipeline

    torch.manual_seed(0)
    tokenizer = gemma_tokenizer()
    pipeline = PRXPipeline(
        transformer=tiny_transformer(4, 2, pixel=False), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=t5gemma_encoder(len(tokenizer)), tokenizer=tokenizer, vae=tiny_vae() if vae else None,
        default_sample_size=SAMPLE_SIZE,
    )
    pipeline.save_pretrained(path)
    return Path(path)


def tiny_prx_pixel_pipeline(path) -> Path:
    """A PRXPixelPipeline saved to `path`: pixel transformer (3 channels, patch 4, bottleneck, resolution
    embedding), Qwen3-VL's text model, Qwen tokenizer, prompt_max_tokens TOKENS."""
    from diffusers import FlowMatchEulerDiscreteScheduler, PRXPixelPipeline

    torch.manual_seed(0)
    tokenizer = qwen_tokenizer()
    pipeline = PRXPixelPipeline(
        transformer=tiny_transformer(3, 4, pixel=True), scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=transformers.Qwen3VLTextModel(qwen3_vl_text_config(len(tokenizer))), tokenizer=tokenizer,
        default_sample_size=SAMPLE_SIZE, prompt_max_tokens=TOKENS,
    )
    pipeline.save_pretrained(path)
    return Path(path)
