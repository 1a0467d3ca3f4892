"""The text tower: prompts -> (token embeddings, padding mask) for the denoiser.

One code path for both kinds of encoder: a transformers model plus its tokenizer. The CPU default is a small T5
encoder initialised from a config and trained jointly with the denoiser, with a byte-level BPE tokenizer that the
`tokenizers` library learns from the data's captions (the shapes world's words, or the caption sample that
`pixrun data prepare` writes). A pretrained encoder (T5Gemma's encoder, a Qwen3 base model, Qwen3-VL's text model,
a T5 / UMT5 encoder) is loaded from a hub id or a local directory, the same way for both, in bf16, and stays frozen;
its class follows the checkpoint's `model_type` unless `encoder_class` names one. `subfolder` and
`tokenizer_subfolder` reach into a diffusers pipeline (text_encoder/ and tokenizer/ of a PRXPipeline or
PRXPixelPipeline), whose prompts the tower then encodes as the pipeline's encode_prompt does: the same cleaning
(`clean`: prx for PRXPipeline, basic for PRXPixelPipeline), token budget (`max_tokens`: PRXPipeline's tokenizer
model_max_length, PRXPixelPipeline's prompt_max_tokens) and states (the last hidden state) at the real tokens. Only the
padding differs: the tower pads on the right to the longest prompt, the pipelines to the token budget on the
tokenizer's side, which PRX's denoiser cannot tell apart (it masks padding and gives text tokens no position).
"""

import functools
import hashlib
import html
import importlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import ftfy
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from torch import nn

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "</s>")
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

# The encoder-only class for each checkpoint family; a full encoder-decoder or causal-LM checkpoint loads into it
# with its decoder / LM head left out.
ENCODER_CLASSES = {
    "t5": "T5EncoderModel",
    "mt5": "MT5EncoderModel",
    "umt5": "UMT5EncoderModel",
    "t5gemma": "T5GemmaEncoderModel",
    "qwen2": "Qwen2Model",
    "qwen3": "Qwen3Model",
    "qwen3_moe": "Qwen3MoeModel",
    "t5_gemma_module": "T5GemmaEncoder",  # T5Gemma's encoder saved alone, as diffusers' PRXPipeline holds it
    "qwen3_vl": "Qwen3VLTextModel",  # a whole Qwen3-VL: its text model only, without the vision tower
    "qwen3_vl_text": "Qwen3VLTextModel",  # Qwen3-VL's text model saved alone, as diffusers' PRXPixelPipeline holds it
}
# Classes of ENCODER_CLASSES that transformers does not export at its top level.
CLASS_MODULES = {"T5GemmaEncoder": "transformers.models.t5gemma.modeling_t5gemma"}
# The text model's weights inside a whole Qwen3-VL: Qwen3VLForConditionalGeneration's, or Qwen3VLModel's.
LANGUAGE_MODEL_KEYS = {r"^model\.language_model\.": "", r"^language_model\.": ""}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
URL = re.compile(r"\b(?:https?://|www\.)\S+", re.IGNORECASE)
HANDLE = re.compile(r"(?<!\w)@\w+")


@dataclass
class TextConfig:
    encoder: str = "small"  # "small" (trained jointly, from scratch) or a hub id / local path (frozen)
    subfolder: str = ""  # the encoder's folder inside `encoder`, e.g. text_encoder of a diffusers pipeline
    tokenizer_subfolder: str = ""  # the tokenizer's, e.g. tokenizer; "": beside the encoder
    encoder_class: str = "auto"  # auto: by the checkpoint's model_type (ENCODER_CLASSES); or a transformers class
    dtype: str = "bfloat16"  # weights of a frozen pretrained encoder: bfloat16 | float32
    width: int = 256  # the small encoder's size
    depth: int = 2
    heads: int = 4
    ff_mult: int = 3
    vocab_size: int = 4096  # the small encoder's tokenizer: at most this many pieces, learnt from the captions
    max_tokens: int = 32  # prompts are truncated to this many tokens (the recipe: 256)
    clean: str = "basic"  # prompt cleaning: none | basic (as diffusers' PRXPixelPipeline) | web (basic + urls, ...)
    #                       | prx (as diffusers' PRXPipeline: DeepFloyd's, lower-cased)
    cache_dir: str | None = None  # embeddings of a frozen encoder kept here (text_cache.py); None: encode each step

    @property
    def trainable(self) -> bool:
        return self.encoder == "small"

    def validate(self) -> None:
        if self.encoder_class not in ("auto", *CLASS_MODULES) and not hasattr(transformers, self.encoder_class):
            raise ValueError(f"text.encoder_class {self.encoder_class!r} is not a transformers class")
        if self.dtype not in DTYPES:
            raise ValueError(f"text.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.clean not in CLEANERS:
            raise ValueError(f"text.clean must be one of {', '.join(CLEANERS)}, got {self.clean!r}")
        if self.width % self.heads:
            raise ValueError(f"text.width {self.width} is not divisible by text.heads {self.heads}")
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"text.vocab_size must be at least {MIN_VOCAB_SIZE} (the 256 bytes every text is made "
                             f"of and {len(SPECIAL_TOKENS)} special tokens), got {self.vocab_size}")
        if self.max_tokens < 1:
            raise ValueError("text.max_tokens must be at least 1")
        if self.cache_dir and self.trainable:
            raise ValueError("text.cache_dir needs a frozen pretrained text.encoder: the small one changes every step")
        if (self.subfolder or self.tokenizer_subfolder) and self.trainable:
            raise ValueError("text.subfolder and text.tokenizer_subfolder need a pretrained text.encoder to look in")


def pad_states(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths along their first dimension (token states (L_i, dim), or masks (L_i,)),
    right-padded with zeros into one (B, L, ...) tensor, L the longest and at least 1, with the (B, L) mask of
    what was there, as TextTower gives its output. The lengths come from the shapes: nothing waits for the
    device."""
    lengths = [len(row) for row in rows]
    length = max(1, *lengths)
    padded = torch.stack([F.pad(row, [0, 0] * (row.dim() - 1) + [0, length - len(row)]) for row in rows])
    mask = torch.arange(length)[None] < torch.tensor(lengths)[:, None]
    return padded, mask.to(padded.device)


def basic_clean(prompt: str) -> str:
    """What diffusers' PRXPixelPipeline does to every prompt: mend mojibake, unescape HTML (twice), strip."""
    return html.unescape(html.unescape(ftfy.fix_text(prompt))).strip()


def web_clean(prompt: str) -> str:
    """basic_clean, then drop urls and @handles and collapse whitespace: for captions scraped from the web."""
    prompt = HANDLE.sub("", URL.sub("", basic_clean(prompt)))
    return " ".join(prompt.split())


@functools.cache
def prx_preprocessor():
    try:
        from diffusers.pipelines.prx.pipeline_prx import TextPreprocessor
    except ImportError as e:
        raise ImportError("text.clean=prx is diffusers' PRX prompt cleaning: install diffusers") from e
    return TextPreprocessor()


def prx_clean(prompt: str) -> str:
    """What diffusers' PRXPipeline does to every prompt (its TextPreprocessor.clean_text): DeepFloyd IF's cleaning,
    lower-cased, without urls, handles, ids, file names, CJK ideographs and most punctuation."""
    return prx_preprocessor().clean_text(prompt)


CLEANERS = {"none": lambda prompt: prompt, "basic": basic_clean, "web": web_clean, "prx": prx_clean}


def train_tokenizer(captions: Iterable[str], vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """A lower-cased byte-level BPE tokenizer learnt from `captions`, that ends every prompt with </s>.

    Byte-level: every text is made of known pieces, so a word never seen encodes into several, never into [UNK].
    Merges stop at `vocab_size` pieces or once every word of the captions is one piece, whichever comes first: with
    a small vocabulary (the shapes world's) each word is one token, as a word-level tokenizer would have it.
    """
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(captions, trainer)
    # The end token keeps the empty prompt (used for guidance) a sequence of one token, never of none.
    end = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", end)])
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


def encoder_class(config: TextConfig, model_type: str) -> type:
    name = config.encoder_class
    if name == "auto":
        if model_type not in ENCODER_CLASSES:
            raise ValueError(
                f"text encoder {config.encoder!r} has model_type {model_type!r}, which pixrun has no encoder class "
                f"for (known: {', '.join(ENCODER_CLASSES)}); set text.encoder_class"
            )
        name = ENCODER_CLASSES[model_type]
    module = importlib.import_module(CLASS_MODULES[name]) if name in CLASS_MODULES else transformers
    return getattr(module, name)


def checkpoint_type(raw_config: dict) -> str:
    """The checkpoint's model_type, read from its config.json as saved (AutoConfig knows no t5_gemma_module)."""
    model_type = raw_config["model_type"]
    # diffusers' PRX pipelines save T5Gemma's encoder alone under the whole model's config: its encoder part counts
    if model_type == "t5gemma" and raw_config.get("architectures") == ["T5GemmaEncoder"]:
        return "t5_gemma_module"
    return model_type


def loading_arguments(model_type: str, raw_config: dict) -> dict:
    """What ENCODER_CLASSES' class for `model_type` needs to load such a checkpoint."""
    if model_type == "t5gemma":  # an encoder-decoder; the encoder-only class wants the flag off
        return {"is_encoder_decoder": False}
    if model_type == "t5_gemma_module":  # the encoder's own config, alone or inside the whole model's
        return {"config": transformers.T5GemmaModuleConfig.from_dict(raw_config.get("encoder", raw_config))}
    if model_type == "qwen3_vl":  # the text model's weights, under their prefix; the vision tower's stay unread
        return {"key_mapping": LANGUAGE_MODEL_KEYS}
    return {}


def pretrained_encoder(config: TextConfig) -> nn.Module:
    """A frozen encoder from a hub id or a local directory, with the same code for both."""
    raw_config, _ = transformers.PreTrainedConfig.get_config_dict(config.encoder, subfolder=config.subfolder)
    model_type = checkpoint_type(raw_config)
    cls = encoder_class(config, model_type)
    extra = loading_arguments(model_type, raw_config) if cls.__name__ == ENCODER_CLASSES.get(model_type) else {}
    encoder, loading = cls.from_pretrained(config.encoder, subfolder=config.subfolder, dtype=DTYPES[config.dtype],
                                           output_loading_info=True, **extra)
    # transformers starts weights the checkpoint lacks from random values, and only says so in its log
    if loading["missing_keys"]:
        missing = sorted(loading["missing_keys"])
        raise ValueError(f"text encoder {config.encoder!r} holds no weights for {len(missing)} of {cls.__name__}'s "
                         f"({', '.join(missing[:3])}, ...): a frozen encoder would stay random; name the class that "
                         "fits the checkpoint in text.encoder_class")
    return encoder


def pretrained_tokenizer(config: TextConfig) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer in `tokenizer_subfolder`, or beside the encoder."""
    subfolder = config.tokenizer_subfolder or config.subfolder
    return transformers.AutoTokenizer.from_pretrained(config.encoder, subfolder=subfolder)


class TextTower(nn.Module):
    def __init__(self, tokenizer, encoder: nn.Module, config: TextConfig):
        super().__init__()
        self.tokenizer = tokenizer
        # Right padding: real tokens keep their positions whatever the batch, so an embedding can be cached.
        # Set in init_kwargs too, which is what save_pretrained writes (for exports).
        self.tokenizer.padding_side = self.tokenizer.init_kwargs["padding_side"] = "right"
        self.encoder = encoder
        self.config = config
        self.max_tokens = config.max_tokens
        self.trainable = config.trainable
        self.clean = CLEANERS[config.clean]
        encoder.requires_grad_(self.trainable)
        self.train()  # a frozen encoder in eval mode from the start

    @property
    def dim(self) -> int:
        return self.encoder.get_input_embeddings().embedding_dim

    @classmethod
    def build(cls, config: TextConfig, captions: Iterable[str], run_dir: Path | None = None) -> "TextTower":
        """A new tower; the small encoder gets fresh weights and a tokenizer learnt from `captions`, cleaned as its
        prompts will be (a word list does too: each word a caption). A pretrained encoder ignores them."""
        if config.trainable:
            tokenizer = train_tokenizer(map(CLEANERS[config.clean], captions), config.vocab_size)
            encoder = small_encoder(config, len(tokenizer))
        else:
            tokenizer = pretrained_tokenizer(config)
            encoder = pretrained_encoder(config)
        tower = cls(tokenizer, encoder, config)
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
        encoder = encoder_class(config, encoder_config.model_type)(encoder_config)
        return cls(tokenizer, encoder, config)

    def train(self, mode: bool = True) -> "TextTower":
        """A frozen encoder stays in eval mode (no dropout) whatever the training loop asks."""
        super().train(mode)
        if not self.trainable:
            self.encoder.eval()
        return self

    def identity(self) -> dict:
        """What determines a frozen tower's embeddings: source, class, settings and a fingerprint of the weights."""
        digest = hashlib.sha256()
        with torch.no_grad():
            for name, p in self.encoder.state_dict().items():
                sample = p.flatten()[:: max(1, p.numel() // 4096)].float().cpu()  # a cheap, spread-out sample
                digest.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
                digest.update(sample.numpy().tobytes())
        settings = asdict(self.config)
        for unused in ("width", "depth", "heads", "ff_mult", "vocab_size", "cache_dir"):  # no bearing on a frozen encoder's output
            settings.pop(unused)
        for place in ("subfolder", "tokenizer_subfolder"):  # unset: left out, so identities from before them hold
            if not settings[place]:
                settings.pop(place)
        return {**settings, "class": type(self.encoder).__name__, "weights": digest.hexdigest()[:32]}

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, dim) embeddings, zero at padding, and the (B, L) mask of real tokens; float32 for a frozen
        encoder whatever its weights' dtype. L is the longest prompt's length, at least 1."""
        device = next(self.encoder.parameters()).device
        cleaned = [self.clean(p) for p in prompts]
        tokens = self.tokenizer(
            cleaned, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        if tokens.input_ids.shape[1] == 0:  # only empty prompts, and a tokenizer that adds no special token
            tokens = self.tokenizer(cleaned, padding="max_length", max_length=1, return_tensors="pt")
        tokens = tokens.to(device)
        attention = tokens.attention_mask
        if self.trainable:
            # The small encoder is pixrun's own T5 (SDPA attention): given the mask ready-made, (B, 1, 1, L) bool,
            # transformers uses it as it is instead of reading it to see whether it can be skipped, which on a GPU
            # would stall every training step.
            attention = attention.bool()[:, None, None, :]
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            out = self.encoder(input_ids=tokens.input_ids, attention_mask=attention).last_hidden_state
        mask = tokens.attention_mask.bool()
        out = torch.where(mask[..., None], out, 0)  # some encoders leave fully masked rows non-finite
        return (out if self.trainable else out.float()), mask
