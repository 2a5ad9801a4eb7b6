"""Published diffusion architectures with random weights, for tests and benchmarks.

Each is built from its configuration (the shapes of the real checkpoint, no weights) and saved
with ``StableDiffusionPipeline.save_pretrained``, so what loads it is the real loading code and
nothing is downloaded. ``tiny-sd`` is small enough for a test (16x16 images, 8x8 latents);
``sd15`` is Stable Diffusion 1.5's UNet, VAE and CLIP ViT-L/14 text encoder; ``bk-sdm-tiny``
is BK-SDM-Tiny's block-removed UNet on SD 1.5's VAE and text encoder.
"""

from __future__ import annotations

from pathlib import Path

import torch

SD15_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "set_alpha_to_one": False, "skip_prk_steps": True,
                  "steps_offset": 1, "prediction_type": "epsilon"}
SD15_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
            "block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4, "norm_num_groups": 32, "sample_size": 512,
            "scaling_factor": 0.18215}
SD15_TEXT = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
             "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
             "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
SD15_UNET = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
             "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8,
             "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
             "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")}

ARCHITECTURES: dict[str, dict] = {
    "tiny-sd": {
        "unet": {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
                 "block_out_channels": (32, 64), "cross_attention_dim": 32, "attention_head_dim": 8,
                 "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                 "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")},
        "vae": {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
                "block_out_channels": (32, 64), "down_block_types": ("DownEncoderBlock2D",) * 2,
                "up_block_types": ("UpDecoderBlock2D",) * 2, "norm_num_groups": 32, "sample_size": 16,
                "scaling_factor": 0.18215},
        "text_encoder": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                         "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        "tokens": 16,
        "scheduler": SD15_SCHEDULER,
    },
    "sd15": {"unet": SD15_UNET, "vae": SD15_VAE, "text_encoder": SD15_TEXT, "tokens": 77, "scheduler": SD15_SCHEDULER},
    # BK-SDM-Tiny (Kim et al., "BK-SDM: A Lightweight, Fast, and Cheap Version of Stable Diffusion", 2023):
    # SD 1.5's UNet with one ResNet-attention pair per down stage (two per up stage), no mid-block and
    # without the innermost, attention-free stage pair (DownBlock2D / UpBlock2D): 323M parameters
    "bk-sdm-tiny": {
        "unet": SD15_UNET | {"layers_per_block": 1, "block_out_channels": (320, 640, 1280),
                             "down_block_types": ("CrossAttnDownBlock2D",) * 3,
                             "up_block_types": ("CrossAttnUpBlock2D",) * 3,
                             "mid_block_type": None},
        "vae": SD15_VAE, "text_encoder": SD15_TEXT, "tokens": 77, "scheduler": SD15_SCHEDULER,
    },
}


def build_tokenizer(max_length: int):
    """A byte-level CLIP tokenizer whose vocabulary is the 256 byte symbols (as word pieces and word
    ends) and no merges: real CLIP tokenization, written here instead of downloaded."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
            vocab[symbol + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def random_parts(name: str, seed: int = 0, prediction_type: str | None = None) -> dict:
    """Architecture ``name`` with random weights (deterministic for ``seed``): the pipeline's parts by name."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    spec = ARCHITECTURES[name]
    tokenizer = build_tokenizer(spec["tokens"])
    text = dict(spec["text_encoder"])
    text.setdefault("vocab_size", len(tokenizer))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**spec["unet"])
        vae = AutoencoderKL(**spec["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**text))
    scheduler = PNDMScheduler(**(spec["scheduler"] | ({"prediction_type": prediction_type} if prediction_type else {})))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def save_random_pipeline(name: str, path: str | Path, seed: int = 0, prediction_type: str | None = None) -> Path:
    """``random_parts`` saved as a ``StableDiffusionPipeline`` directory (what ``load_backend`` reads)."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(**random_parts(name, seed, prediction_type), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(Path(path), safe_serialization=True)
    return Path(path)
