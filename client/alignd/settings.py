"""Client-side settings, read from ``ALIGND_*`` environment variables.

This module and :class:`alignd.platform.PlatformEnv` (service targets, token, TLS) are the only
places the client reads the environment; everything else receives values from them or its caller.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ClientSettings(BaseSettings):
    """Settings of the alignd SDK and CLI on this machine."""

    model_config = SettingsConfigDict(
        env_prefix="ALIGND_", extra="ignore", use_attribute_docstrings=True
    )

    home: Path = Field(default=Path("~/.cache/alignd"))
    """Directory holding alignd's local state: downloaded wheels (``wheels/``) and prepared
    models (``models/<name>/``). Set ``ALIGND_HOME`` to move it, e.g. to a CI cache directory.
    A leading ``~`` is expanded."""

    @field_validator("home")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()


def home() -> Path:
    """Return alignd's home directory (``ALIGND_HOME``, default ``~/.cache/alignd``).

    Returns:
        The expanded path; it is not created here.
    """
    return ClientSettings().home
