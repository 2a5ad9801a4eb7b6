"""The documentation says what the code does: generated parts are current, links land, README stays short."""

import re
import subprocess
import sys
from pathlib import Path

from edge_sdk.protocol.errors import Refusal

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_generated_parts_of_the_docs_match_the_code():
    result = subprocess.run([sys.executable, str(ROOT / "docs" / "generate.py"), "--check"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_readme_is_short_enough_to_read():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_every_refusal_reason_is_documented():
    security = (ROOT / "docs" / "security.md").read_text()
    assert [r.value for r in Refusal if f"| `{r.value}` |" not in security] == []


def test_every_relative_link_lands_on_a_file_and_heading():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+\.md)(#[^)]+)?\)", page.read_text()):
            path, anchor = (page.parent / target[0]).resolve(), target[1][1:]
            if not path.exists():
                broken.append(f"{page.name} -> {target[0]}")
            elif anchor and anchor not in {_slug(h) for h in re.findall(r"^#+ (.+)$", path.read_text(), re.M)}:
                broken.append(f"{page.name} -> {target[0]}#{anchor}")
    assert broken == []


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
