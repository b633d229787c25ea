"""Names that become paths: one validator for every name read from a CSV, a JSON file or the command line.

A split, a volume name, an anatomy name or an output name becomes one component of a path under an output
folder (``OUT/{split}/{volume}/``). :func:`safe_component` accepts only names that cannot leave that folder
or mean something special to the file system: no separator (``/``, ``\\``), not ``.`` or ``..``, no leading
dot (hidden and temporary names are the store's own: ``.tmp.*``, ``.trash.*``, ``.failed``), no control
characters, no leading or trailing blanks, at most 255 bytes. :func:`inside` checks a finished path.
"""

from __future__ import annotations

import os
from pathlib import Path

#: longest file name most file systems take (bytes, UTF-8)
MAX_NAME_BYTES = 255


def component_problem(name: object) -> str | None:
    """Why ``name`` is not one safe path component, or ``None`` when it is."""
    if not isinstance(name, str):
        return f"must be text, got {type(name).__name__}"
    if name == "":
        return "is empty"
    if name in (".", ".."):
        return "is a relative directory reference"
    if "/" in name or "\\" in name:
        return "contains a path separator ('/' or '\\')"
    if name.startswith("."):
        return "starts with '.' (hidden and temporary names are reserved)"
    if name != name.strip():
        return "starts or ends with a blank"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains a control character"
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    return None


def safe_component(name: object, what: str, source: str | os.PathLike | None = None) -> str:
    """``name`` unchanged when it is one safe path component, else ``ValueError`` naming the file and value.

    ``what`` says what the name is (``"split"``, ``"volume name"``, ...); ``source`` is where it was read
    (e.g. ``"pairs.csv line 3"``).
    """
    why = component_problem(name)
    if why is not None:
        where = f"{source}: " if source else ""
        raise ValueError(f"{where}{what} {name!r} {why}: it must be a single file or folder name, since it "
                         f"becomes part of an output path")
    return name  # type: ignore[return-value]


def inside(path: str | os.PathLike, root: str | os.PathLike) -> Path:
    """``path`` when it lies inside ``root`` (after resolving ``..`` and symbolic links), else ``ValueError``."""
    p, r = Path(path), Path(root)
    rp, rr = p.resolve(), r.resolve()
    if rp != rr and rr not in rp.parents:
        raise ValueError(f"{p} lies outside {r}: refusing to write or delete there")
    return p
