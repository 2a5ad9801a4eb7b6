"""``fedaigc adapters``: a cluster's adapter, from the aggregator's state, in the format image tools load."""

from __future__ import annotations

import argparse
import json
import sys

from aggregator.cli._common import load_config


def register(sub) -> None:
    p = sub.add_parser("adapters", help="export a cluster's adapter for diffusers, ComfyUI / A1111 (kohya) or peft",
                       description="Read a cluster's current adapter from the aggregator's state store and write it "
                                   "in a format image tools load; every key is checked to land in the base model.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    e = actions.add_parser("export", help="write one cluster's adapter",
                           description="Write cluster N's adapter: diffusers (a directory for "
                                       "pipe.load_lora_weights), kohya (one .safetensors) or peft (a directory).")
    e.add_argument("--cluster", type=int, required=True, metavar="N", help="the cluster id (fedaigc status lists them)")
    e.add_argument("--format", choices=("diffusers", "kohya", "peft"), default="diffusers")
    e.add_argument("--out", required=True, metavar="PATH", help="directory (diffusers, peft) or .safetensors (kohya)")
    e.add_argument("--config", help="aggregator.toml: the fleet's state store, base model and LoRA config")
    e.add_argument("--state", help="state store, if not the config's: a SQLite path or postgresql://...")
    e.add_argument("--base-model", metavar="DIR", help="the fleet's base model, if not the config's")
    e.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    config = load_config(args.config, state_url=args.state, base_model=args.base_model)
    from aggregator.state import open_store
    from edge_sdk.protocol.tensors import unpack_tensors
    from models.backend import load_backend
    from models.lora_formats import LoraFormatError, save_lora

    store = open_store(config.store_url, create=False)
    try:
        clusters = store.clusters()
    finally:
        store.close()
    if args.cluster not in clusters:
        print(f"fedaigc adapters: no cluster {args.cluster} in {config.store_url}; clusters: {sorted(clusters)}",
              file=sys.stderr)
        return 2
    _, blob, version = clusters[args.cluster]
    backend = load_backend(config.base_model)
    try:
        out = save_lora(unpack_tensors(blob), config.lora, args.out, args.format, backend.denoiser,
                        backend.model_version)
    except (LoraFormatError, ValueError) as e:
        print(f"fedaigc adapters: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"cluster": args.cluster, "version": version, "format": args.format, "out": str(out)}))
    return 0
