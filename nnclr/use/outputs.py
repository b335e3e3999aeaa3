"""The output paths a user types (``embed --out``, ``--html``): checked before any work is done.

A name longer than the file system allows, a folder where a file is to go (or the reverse), a
missing parent folder: one line naming the flag and what to do, instead of an ``OSError`` after
minutes of embedding. Writing itself (a full or read-only disk) is :mod:`nnclr.rundir`'s.
"""

from __future__ import annotations

import os
from pathlib import Path

from nnclr.errors import UserError, shown_path
from nnclr.rundir import tmp_path

NAME_MAX = 255  # bytes per name on Linux, macOS and Windows file systems; the file system's own when it says
TMP_EXTRA = len(tmp_path(Path("x")).name) - 1  # a file is first written under its temporary name (nnclr.rundir)


def _shown(path: Path) -> str:
    return shown_path(path, limit=100)


def _name_max(path: Path) -> int:
    """The longest name (bytes) the file system of ``path``'s nearest existing folder allows."""
    for folder in (path, *path.parents):
        try:
            if folder.is_dir():
                return int(os.pathconf(folder, "PC_NAME_MAX"))
        except (OSError, ValueError, AttributeError):  # too long itself, no pathconf (Windows), ...
            continue
    return NAME_MAX


def _check_names(path: Path, flag: str, extra: int) -> None:
    """Every name of ``path`` fits the file system (its last one with ``extra`` bytes added)."""
    limit = _name_max(path.parent)
    parts = path.parts
    for i, part in enumerate(parts):
        added = extra if i == len(parts) - 1 else 0
        size = len(os.fsencode(part))
        if size + added > limit:
            why = f" ({limit} per name, less the {added} of the temporary name nnclr writes first)" if added else ""
            raise UserError(
                f"{flag} {_shown(path)}: the name '{part[:24]}...' is {size} bytes, but this file system allows at "
                f"most {limit - added}{why}; choose a shorter name"
            )


def output_file(text: str | Path, flag: str) -> Path:
    """The file ``flag`` names (e.g. ``--html``), checked to be writable as a name: returned expanded.

    Raises:
        UserError: a name too long, a folder at that path, or a parent folder that does not exist.
    """
    path = Path(text).expanduser()
    _check_names(path, flag, TMP_EXTRA)
    try:
        if path.is_dir():
            raise UserError(f"{flag} {_shown(path)} is a folder; pass a file name, e.g. {path / 'gallery.html'}")
        if not path.parent.is_dir():
            raise UserError(f"{flag} {_shown(path)}: folder {path.parent} does not exist; create it or pass a file "
                            "name in an existing folder")
    except OSError as error:
        raise UserError(f"{flag} {_shown(path)} cannot be used ({error.strerror or error}); pass another path") \
            from None
    return path


def output_folder(text: str | Path, flag: str) -> Path:
    """The folder ``flag`` names (e.g. ``--out``), created later if missing: returned expanded.

    Raises:
        UserError: a name too long, or a file at that path.
    """
    path = Path(text).expanduser()
    _check_names(path, flag, 0)
    try:
        if path.exists() and not path.is_dir():
            raise UserError(f"{flag} {_shown(path)} is a file; pass a folder (it is created if missing)")
    except OSError as error:
        raise UserError(f"{flag} {_shown(path)} cannot be used ({error.strerror or error}); pass another path") \
            from None
    return path
