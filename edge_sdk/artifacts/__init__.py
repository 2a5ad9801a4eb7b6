"""The export artifact format, read by the exporter that writes it and the device that runs it.

``manifest`` (what an export directory holds, the base it was made from, what was measured),
``ptd`` (external weight files and the swappable adapter slot), and the readers of the two
ExecuTorch programs: ``inference`` (``ExecuTorchDenoiser``) and ``training``
(``ExecuTorchTrainer``). Nothing here needs the export toolchain, only the ExecuTorch runtime;
nothing here imports the device runtime, which ``lint-imports`` checks. Signing an artifact
belongs to whoever rolls it out (``aggregator/rollout.py``).
"""
