"""A platform described by ``ALIGND_*`` environment variables (``Platform.from_env``); with
:mod:`alignd.settings`, the only place the client reads the environment."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from alignd.platform.config import ROLES, PlatformConfig, validate


class PlatformEnv(BaseSettings):
    """A platform described by ``ALIGND_*`` environment variables (:meth:`Platform.from_env`)."""

    model_config = SettingsConfigDict(
        env_prefix="ALIGND_", extra="ignore", use_attribute_docstrings=True
    )

    generation_target: str | None = None
    """``host:port`` of the generation service; several replicas separated by commas."""
    generation_dns: str | None = None
    """Instead: ``host:port`` of a name whose DNS records are the generation replicas (a
    headless Service)."""
    reward_target: str | None = None
    """``host:port`` of the reward service."""
    reference_target: str | None = None
    """``host:port`` of the reference service."""
    trainer_target: str | None = None
    """``host:port`` of the trainer service."""
    token: SecretStr | None = None
    """Bearer token sent on every call."""
    token_file: Path | None = None
    """File holding the bearer token (first non-empty line)."""
    tls_ca: Path | None = None
    """PEM CA bundle of the servers' certificates; setting any ``ALIGND_TLS_*`` turns on TLS."""
    tls_client_cert: Path | None = None
    """PEM client certificate, for mutual TLS."""
    tls_client_key: Path | None = None
    """PEM private key of the client certificate."""
    tls_server_name: str | None = None
    """Expected server name, when it differs from the targets' host."""

    def to_config(self) -> PlatformConfig:
        """The equivalent :class:`PlatformConfig`; errors name the environment variables."""
        tls = {
            "ca": self.tls_ca,
            "cert": self.tls_client_cert,
            "key": self.tls_client_key,
            "server_name": self.tls_server_name,
        }
        generation = [t.strip() for t in (self.generation_target or "").split(",") if t.strip()]
        document = {
            "services": {
                "generation": generation,
                "generation_dns": self.generation_dns,
                "reward": self.reward_target,
                "reference": self.reference_target,
                "trainer": self.trainer_target,
            },
            "tls": tls if any(v is not None for v in tls.values()) else None,
            "token": self.token,
            "token_file": self.token_file,
        }
        names = {f"services.{role}": f"ALIGND_{role.upper()}_TARGET" for role in ROLES}
        names["services.generation_dns"] = "ALIGND_GENERATION_DNS"
        names.update(
            {
                "tls.ca": "ALIGND_TLS_CA",
                "tls.cert": "ALIGND_TLS_CLIENT_CERT",
                "tls.key": "ALIGND_TLS_CLIENT_KEY",
                "tls.server_name": "ALIGND_TLS_SERVER_NAME",
            },
            services="ALIGND_{GENERATION,REWARD,REFERENCE,TRAINER}_TARGET",
            tls="ALIGND_TLS_CLIENT_CERT, ALIGND_TLS_CLIENT_KEY",
            token="ALIGND_TOKEN",
            token_file="ALIGND_TOKEN_FILE",
        )
        return validate(PlatformConfig, document, "environment", names)
