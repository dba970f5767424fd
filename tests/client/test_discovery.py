"""Generation replicas found by DNS (a headless Service): resolved when the platform is made,
and again when a replica fails, so jobs sample from and push to the pods that exist now."""

from __future__ import annotations

import pytest

import alignd
from alignd.platform import PlatformConfigError


class Resolver:
    """A recording DNS stub: the addresses each name has now, and every lookup made."""

    def __init__(self, records: dict[str, list[str]]) -> None:
        self.records = records
        self.lookups: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append((host, port))
        if host not in self.records:
            raise OSError(f"[Errno -2] Name or service not known: {host!r}")
        return list(self.records[host])


NAME = "prod-alignd-generation-headless.rlhf.svc"


def test_the_replicas_are_the_records_of_the_name():
    dns = Resolver({NAME: ["10.0.0.9", "10.0.0.2", "fd00::5", "10.0.0.2"]})
    platform = alignd.Platform(generation_dns=f"{NAME}:50051", trainer="t:1", resolver=dns)
    assert platform.generation_targets == ["10.0.0.2:50051", "10.0.0.9:50051", "[fd00::5]:50051"]
    assert dns.lookups == [(NAME, 50051)]
    assert [c.target for c in platform.generation_clients()] == platform.generation_targets


def test_rediscover_follows_pods_that_come_and_go_and_keeps_them_when_dns_fails():
    dns = Resolver({NAME: ["10.0.0.1", "10.0.0.2"]})
    platform = alignd.Platform(generation_dns=f"{NAME}:50051", resolver=dns)
    before = platform.generation_clients()
    assert platform.rediscover() is False and platform.generation_clients() is before
    dns.records[NAME] = ["10.0.0.1", "10.0.0.3"]  # pod 2 replaced
    assert platform.rediscover() is True
    assert platform.generation_targets == ["10.0.0.1:50051", "10.0.0.3:50051"]
    assert [c.target for c in platform.generation_clients()] == platform.generation_targets
    del dns.records[NAME]  # the DNS server is down for a moment
    assert platform.rediscover() is False
    assert platform.generation_targets == ["10.0.0.1:50051", "10.0.0.3:50051"]
    dns.records[NAME] = []
    assert platform.rediscover() is False  # no records: keep what we have
    assert len(dns.lookups) == 5
    platform.close()


def test_fixed_targets_are_never_looked_up():
    dns = Resolver({})
    platform = alignd.Platform(generation=["g:1"], resolver=dns)
    assert platform.rediscover() is False and dns.lookups == []


def test_a_name_without_records_is_an_error_naming_it():
    with pytest.raises(PlatformConfigError, match=r"generation_dns 'nope\.svc:1': .*not known"):
        alignd.Platform(generation_dns="nope.svc:1", resolver=Resolver({}))
    with pytest.raises(PlatformConfigError, match="has no records"):
        alignd.Platform(generation_dns="empty:1", resolver=Resolver({"empty": []}))
    with pytest.raises(PlatformConfigError, match="give generation or generation_dns"):
        alignd.Platform(generation=["g:1"], generation_dns="x:1", resolver=Resolver({}))


def test_the_environment_names_the_headless_service(monkeypatch):
    for name in ("GENERATION_TARGET", "REWARD_TARGET", "REFERENCE_TARGET", "TRAINER_TARGET"):
        monkeypatch.delenv(f"ALIGND_{name}", raising=False)
    monkeypatch.setenv("ALIGND_GENERATION_DNS", "localhost:50051")
    platform = alignd.Platform.from_env()
    assert platform.generation_dns == "localhost:50051"
    assert "127.0.0.1:50051" in platform.generation_targets  # the system resolver
