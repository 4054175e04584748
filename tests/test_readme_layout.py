"""The README's "Layout" section names every package and module of ``bafm/``."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _layout_block() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## Layout\n\n```\n(.*?)^```", text, flags=re.S | re.M)
    assert match, "README.md has no '## Layout' section with a code block"
    return match.group(1)


def test_readme_layout_names_every_module():
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", _layout_block().replace("-", "_")))
    package = ROOT / "bafm"
    missing = sorted(
        str(path.relative_to(ROOT))
        for path in package.rglob("*.py")
        if path.stem not in ("__init__", "__main__") and path.stem not in words
    )
    missing += sorted(str(d.relative_to(ROOT)) + "/" for d in package.iterdir()
                      if (d / "__init__.py").is_file() and d.name not in words)
    assert not missing, f"README.md's Layout section does not mention: {', '.join(missing)}"
