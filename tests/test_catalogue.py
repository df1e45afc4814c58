"""The event catalogue in README.md is generated from the event docstrings."""

from __future__ import annotations

from pathlib import Path

from events.catalogue import BEGIN, END, render, replace_block
from events.types import EVENT_CLASSES

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_event_class_has_a_docstring() -> None:
    """Each event says when it is emitted."""
    for name, cls in EVENT_CLASSES.items():
        assert cls.__doc__ and len(cls.__doc__.strip()) > 20, name


def test_readme_catalogue_is_current() -> None:
    """README.md holds exactly the catalogue rendered from the code (run `make catalogue`)."""
    text = README.read_text(encoding="utf-8")
    assert BEGIN in text and END in text
    assert replace_block(text) == text, "README.md event catalogue is stale: run `make catalogue`"
    for name in EVENT_CLASSES:
        assert f"`{name}`" in render()
