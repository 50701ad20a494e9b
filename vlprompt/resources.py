"""Files that live at the top of the repository and ship inside the wheel.

``datasets/`` and ``configs/`` sit at the repository's top level (editable installs read them
there); a wheel build copies them into the package as ``vlprompt/_datasets`` and
``vlprompt/_configs``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["bundled_dir"]

_PACKAGE = Path(__file__).resolve().parent


def bundled_dir(name: str) -> Path:
    """The folder ``name`` (``datasets`` or ``configs``) from the wheel or the source checkout."""
    candidates = (_PACKAGE / f"_{name}", _PACKAGE.parent / name)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"no {name!r} folder found; looked in: " + ", ".join(str(c) for c in candidates))
