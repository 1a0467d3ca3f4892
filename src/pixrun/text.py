"""The text tower: prompts -> (token embeddings, padding mask) for the denoiser.

One code path for both kinds of encoder: a transformers model plus its tokenizer. The CPU default is a small T5
encoder initialised from a config and trained jointly with the denoiser, with a word-level tokenizer built by the
`tokenizers` library from the data's vocabulary; a pretrained encoder is the same class loaded from a hub id or a
local directory, and stays frozen.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from torch import nn

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "</s>")


@dataclass
class TextConfig:
    encoder: str = "small"  # "small" (trained jointly, from scratch) or a hub id / local path (frozen)
    encoder_class: str = "T5EncoderModel"  # any transformers class whose output has `last_hidden_state`
    width: int = 256  # the small encoder's size
    depth: int = 2
    heads: int = 4
    ff_mult: int = 3
    max_tokens: int = 32

    @property
    def trainable(self) -> bool:
        return self.encoder == "small"

    def validate(self) -> None:
        if not hasattr(transformers, self.encoder_class):
            raise ValueError(f"text.encoder_class {self.encoder_class!r} is not a transformers class")
        if self.width % self.heads:
            raise ValueError(f"text.width {self.width} is not divisible by text.heads {self.heads}")
        if self.max_tokens < 1:
            raise ValueError("text.max_tokens must be at least 1")


def word_tokenizer(vocabulary: list[str]) -> transformers.PreTrainedTokenizerFast:
    """A lower-cased, whitespace-split word-level tokenizer that ends every prompt with </s>."""
    words = sorted({w.lower() for w in vocabulary} - set(SPECIAL_TOKENS))
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # The end token keeps the empty prompt (used for guidance) a sequence of one token, never of none.
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>"
    )


def small_encoder(config: TextConfig, vocab_size: int) -> nn.Module:
    t5 = transformers.T5Config(
        vocab_size=vocab_size,
        d_model=config.width,
        d_kv=config.width // config.heads,
        num_heads=config.heads,
        num_layers=config.depth,
        d_ff=config.ff_mult * config.width,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
    )
    return transformers.T5EncoderModel(t5)


class TextTower(nn.Module):
    def __init__(self, tokenizer, encoder: nn.Module, max_tokens: int, trainable: bool):
        super().__init__()
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.max_tokens = max_tokens
        self.trainable = trainable
        encoder.requires_grad_(trainable)

    @property
    def dim(self) -> int:
        return self.encoder.get_input_embeddings().embedding_dim

    @classmethod
    def build(cls, config: TextConfig, vocabulary: list[str], run_dir: Path | None = None) -> "TextTower":
        """A new tower; the small encoder gets a tokenizer from `vocabulary` and fresh weights."""
        if config.trainable:
            tokenizer = word_tokenizer(vocabulary)
            encoder = small_encoder(config, len(tokenizer))
        else:
            tokenizer = transformers.AutoTokenizer.from_pretrained(config.encoder)
            encoder = getattr(transformers, config.encoder_class).from_pretrained(config.encoder)
        tower = cls(tokenizer, encoder, config.max_tokens, config.trainable)
        if run_dir is not None:
            tower.save_definition(run_dir)
        return tower

    def save_definition(self, run_dir: Path) -> None:
        """Tokenizer and encoder config into the run, so the tower can be rebuilt without the data."""
        self.tokenizer.save_pretrained(run_dir / "tokenizer")
        self.encoder.config.save_pretrained(run_dir / "text_encoder")

    @classmethod
    def load(cls, config: TextConfig, run_dir: Path) -> "TextTower":
        """Rebuild a run's tower; a trained small encoder's weights come from the run's checkpoint."""
        if not config.trainable:
            return cls.build(config, [])
        tokenizer = transformers.AutoTokenizer.from_pretrained(run_dir / "tokenizer")
        encoder_config = transformers.AutoConfig.from_pretrained(run_dir / "text_encoder")
        encoder = getattr(transformers, config.encoder_class)(encoder_config)
        return cls(tokenizer, encoder, config.max_tokens, trainable=True)

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.encoder.parameters()).device
        tokens = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(device)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            out = self.encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        return out.last_hidden_state, tokens.attention_mask.bool()
