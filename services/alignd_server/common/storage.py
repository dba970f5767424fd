"""Confinement of filesystem paths that arrive in requests (``--storage-root``).

A path in a request (a checkpoint, a weights directory, a model to initialise from) is
resolved the way the kernel would follow it — ``..`` components and every symlink on the way,
with :func:`os.path.realpath` — and must then lie inside one of the configured roots; anything
else is INVALID_ARGUMENT naming the field. Relative paths resolve inside the first root, never
in the server's working directory. Prepared bundled models (``ALIGND_HOME/models``) are always
readable, so ``Initialize`` can name them, but never writable through a request.

The check is made when the request arrives; a symlink swapped in afterwards by someone who can
already write inside a root is outside what this guards against.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from alignd.settings import home
from alignd_server.common.errors import InvalidArgument

MAX_PATH_CHARS = 4096


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


class StorageRoots:
    """The directories request paths must stay inside.

    Args:
        roots: writable and readable roots; empty = alignd's home.
        readable: extra roots that may only be read (default: the prepared models).
    """

    def __init__(self, roots: Sequence[Path | str], readable: Sequence[Path | str] | None = None):
        chosen = [Path(r).expanduser() for r in roots] or [home()]
        self.roots = [_real(r) for r in chosen]
        extra = [home() / "models"] if readable is None else [Path(r) for r in readable]
        self.readable = [*self.roots, *(_real(r) for r in extra)]

    def describe(self) -> str:
        return ", ".join(str(r) for r in self.roots)

    def resolve(self, path: str, field: str, *, write: bool = False) -> Path:
        """The real path ``path`` names, checked to lie inside a root.

        Args:
            path: the path as the request gives it.
            field: the request field, for errors.
            write: the caller will create or replace something there (read-only roots do not
                count).

        Raises:
            InvalidArgument: empty, too long, a NUL byte, or outside every root.
        """
        if not path:
            raise InvalidArgument(field, "must be set")
        if len(path) > MAX_PATH_CHARS or "\x00" in path:
            raise InvalidArgument(field, f"must be a path of at most {MAX_PATH_CHARS} characters")
        candidate = Path(path)
        if not candidate.is_absolute():
            candidate = self.roots[0] / candidate
        real = _real(candidate)
        allowed = self.roots if write else self.readable
        if not any(real == root or real.is_relative_to(root) for root in allowed):
            raise InvalidArgument(
                field,
                f"{path!r} leads outside the storage roots ({self.describe()}); the server's "
                "--storage-root decides where paths may lead",
            )
        return real
