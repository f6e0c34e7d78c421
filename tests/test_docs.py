"""The reading guide stays true: every file and function it names exists."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def named_places(text: str) -> list[tuple[str, list[str]]]:
    """(file, [names]) of every `path.py` or `path.py: name, name` in backticks."""
    places = []
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold commands, not names
    for quoted in re.findall(r"`([^`]+)`", text):
        match = re.fullmatch(r"([\w/]+\.py)(?::\s*([\w., ]+))?", quoted)
        if match:
            places.append((match.group(1), [n.strip() for n in (match.group(2) or "").split(",") if n.strip()]))
    return places


def resolve(path: str) -> Path:
    for candidate in (REPO / path, REPO / "cifar_dist" / path):
        if candidate.is_file():
            return candidate
    raise AssertionError(f"docs/architecture.md names {path}, which does not exist")


def test_the_reading_guide_names_only_what_exists():
    places = named_places((REPO / "docs" / "architecture.md").read_text())
    assert len(places) > 30
    for path, names in places:
        source = resolve(path).read_text()
        for name in names:
            last = name.split(".")[-1]
            assert re.search(rf"^\s*(def|class) {last}\b|^{last} = ", source, re.M), f"{path} has no {name}"


def test_the_check_would_notice_a_missing_function():
    (path, names), = named_places("`cifar_dist/engine/trainer.py: Trainer.no_such_method`")
    source = resolve(path).read_text()
    assert not re.search(rf"^\s*(def|class) {names[0].split('.')[-1]}\b", source, re.M)
