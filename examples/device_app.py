"""A minimal device app: train one personal round offline and save samples as a PNG; with a bundle, federate.

    python examples/device_app.py --out device-samples.png
    python examples/device_app.py --bundle dev-001.json   # from `fedaigc provision dev-001 --out dev-001.json`

Uses a persona of the styled-digits benchmark as "the user's" images and prompts; a real
app would pass the user's own images (16x16, ink = 1) and the prompts they typed.
"""

from __future__ import annotations

import argparse
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from edge_sdk import DeviceConfig, EdgeClient, FederatedSession, LocalData, ProvisioningBundle  # noqa: E402
from models.digits.data import STYLES, make_personas  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--style", default="framed", choices=STYLES)
    parser.add_argument("--steps", type=int, default=150, help="local training steps")
    parser.add_argument("--profile", default="raspberry-pi-4")
    parser.add_argument("--data-dir", default=None, help="where keys and adapters live (default: a temp dir)")
    parser.add_argument("--bundle", help="a provisioning bundle: join its federation after the offline round")
    parser.add_argument("--out", default="device-samples.png")
    args = parser.parse_args()

    persona = make_personas(1, 1, seed=0, styles=[args.style])[0]
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="fedaigc-device-")
    bundle = ProvisioningBundle.load(args.bundle) if args.bundle else None
    config = (bundle.device_config(data_dir, profile=args.profile) if bundle
              else DeviceConfig(data_dir=data_dir, profile=args.profile))  # offline: nothing to pin
    client = EdgeClient(config)
    data = LocalData.from_persona(persona)
    update = client.train_round(None, data, steps=args.steps)
    print(f"trained {update.steps} steps on {update.samples} images: loss {update.loss_before:.4f} -> "
          f"{update.loss_after:.4f}; adapters saved under {client.data_dir}")

    if bundle is not None:  # enrol with the bundle's token at the pinned aggregator, train its rounds
        session = FederatedSession(client, data, bundle.mqtt_config(data_dir)).start()
        print(f"{bundle.device_id}: joined {bundle.broker_url}, aggregator {bundle.aggregator_fingerprint}")
        session.finished.wait()
        session.stop()
        print(f"federation finished after {len(session.rounds)} rounds")

    prompts = list(persona.test_prompts)[:8]
    fig, axes = plt.subplots(2, len(prompts), figsize=(len(prompts) * 1.1, 2.6))
    for j, prompt in enumerate(prompts):
        axes[0][j].imshow(client.generate(prompt, n=1, mix={}, seed=j)[0, 0], cmap="gray", vmin=0, vmax=1)
        axes[1][j].imshow(client.generate(prompt, n=1, seed=j)[0, 0], cmap="gray", vmin=0, vmax=1)
        axes[0][j].set_title(prompt[:18], fontsize=5)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].set_ylabel("base", fontsize=7)
    axes[1][0].set_ylabel("personal", fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
