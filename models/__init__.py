"""The diffusion family of fedaigc: denoiser, prompt encoder, LoRA adapters, data, evaluators.

Knows nothing about MQTT, keys or rounds.
"""

import logging
import os

# torchao's prebuilt CUDA kernels cannot load on CPU-only machines and only add noise.
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
# Known, harmless import-time chatter of torchao 0.18 on torch 2.13 (deprecation notes and a
# version-probe miss in diffusers); silenced by name so real warnings still show.
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_name).setLevel(logging.ERROR)
