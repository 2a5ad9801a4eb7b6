"""Regenerate the parts of docs/ that are read off the code, so they cannot drift from it.

    python docs/generate.py           rewrite them
    python docs/generate.py --check   exit 1 if any is stale (tests/test_docs.py runs this)

A generated part sits between ``<!-- generated: NAME -->`` and ``<!-- end generated -->``:
``topics`` (docs/protocol.md) from ``edge_sdk.protocol.topics.LAYOUT``, ``config``
(docs/aggregator.md) from the settings of ``aggregator.config.AggregatorConfig``, ``profiles``
(docs/device-sdk.md) from ``edge_sdk.config.PROFILES``.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def topics_table() -> str:
    from edge_sdk.protocol.topics import LAYOUT

    rows = ["| topic (under `{prefix}/v1/`) | published by | read by | retained | carries |", "|---|---|---|---|---|"]
    rows += [f"| `{t.pattern}` | {t.publisher} | {t.reader} | {'yes' if t.retained else ''} | {t.carries} |"
             for t in LAYOUT]
    return "\n".join(rows)


def _default(f: dataclasses.Field) -> str:
    value = f.default
    if isinstance(value, Path) and value.is_absolute():  # the bundled model: where it lies in the package
        value = value.relative_to(ROOT)
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)) and len(str(value)) > 40:
        return f"{len(value)} values"
    return f"`{value}`"


def config_table() -> str:
    from aggregator.config import AggregatorConfig

    rows = ["| setting | default | what it does |", "|---|---|---|"]
    rows += [f"| `{f.name}` | {_default(f)} | {f.metadata.get('doc', '')} |" for f in dataclasses.fields(AggregatorConfig)]
    return "\n".join(rows)


def profiles_table() -> str:
    from edge_sdk.config import PROFILES

    names = [f.name for f in dataclasses.fields(next(iter(PROFILES.values()))) if f.name not in ("name", "description")]
    rows = ["| profile | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    rows += [f"| `{p.name}` | " + " | ".join(str(getattr(p, n)) for n in names) + " |" for p in PROFILES.values()]
    return "\n".join(rows)


PARTS = {"topics": ("protocol.md", topics_table), "config": ("aggregator.md", config_table),
         "profiles": ("device-sdk.md", profiles_table)}


def regenerate(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- generated: {name} -->\n)(?:.*?\n)?(<!-- end generated -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"no '<!-- generated: {name} -->' section to fill")
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale parts; exit 1 if any")
    args = parser.parse_args(argv)
    stale = []
    for name, (doc, make) in PARTS.items():
        path = ROOT / "docs" / doc
        text = path.read_text()
        new = regenerate(text, name, make())
        if new != text:
            stale.append(f"docs/{doc} ({name})")
            if not args.check:
                path.write_text(new)
    if stale:
        print(("stale: " if args.check else "regenerated: ") + ", ".join(stale))
        if args.check:
            print("run: python docs/generate.py")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
