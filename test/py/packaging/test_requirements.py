"""The declared torch floor is one the code runs on (the three places that state it agree)."""

from __future__ import annotations

import re
from pathlib import Path

from ampipe import env_probe

PY = Path(__file__).resolve().parents[3] / "py"
# The newest torch feature the code relies on, and the release that brought it.
NEEDS = {"enable_gqa": (2, 5)}  # F.scaled_dot_product_attention(..., enable_gqa=) (attention.py)


def _floor(spec: str) -> tuple[int, ...]:
    m = re.fullmatch(r"torch>=([\d.]+)", spec.strip())
    assert m, f"expected 'torch>=X.Y', got {spec!r}"
    return tuple(int(p) for p in m.group(1).split("."))


def test_torch_floor_is_the_same_everywhere_and_covers_what_the_code_uses():
    req = next(line for line in (PY / "requirements.txt").read_text().splitlines()
               if line.startswith("torch"))
    project = re.search(r'"(torch>=[\d.]+)"', (PY / "pyproject.toml").read_text()).group(1)
    floors = {_floor(req), _floor(project),
              _floor("torch>=" + env_probe.MIN_VERSIONS["torch"])}
    assert len(floors) == 1, f"torch floors disagree: {floors}"
    floor = floors.pop()
    source = (PY / "ampipe" / "model" / "attention.py").read_text()
    for feature, since in NEEDS.items():
        if feature in source:
            assert floor >= since, f"attention.py uses {feature} (torch >= {since}); floor is {floor}"


def test_no_device_reading_is_quoted_that_was_not_taken_here():
    # Nothing in this project has run on a GPU yet: a clock or a time read off one would be
    # a figure nobody measured (vendors' spec-sheet peaks are labelled as such elsewhere).
    root = PY.parent
    files = [*(root / "py" / "ampipe").rglob("*.py"), *(root / "docs").glob("*.md"), root / "README.md"]
    quoted = [f"{f.relative_to(root)}:{i + 1}" for f in files
              for i, line in enumerate(f.read_text().splitlines())
              if re.search(r"\d\s*MHz", line)]
    assert not quoted, f"clock readings quoted: {quoted}"
