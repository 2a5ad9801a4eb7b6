"""The diffusion family of fedaigc: denoiser, prompt encoder, LoRA adapters, data, evaluators.

Knows nothing about MQTT, keys or rounds.
"""

import os

# torchao's prebuilt CUDA kernels cannot load on CPU-only machines and only add noise.
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
