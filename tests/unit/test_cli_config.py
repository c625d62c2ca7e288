"""The configuration `txproc serve` builds from its flags (actors.app.cli.build_config)."""

from __future__ import annotations

import pytest

from actors.app.cli import _parser, build_config
from processor.config import Config


def _config(*flags: str) -> Config:
    return build_config(_parser().parse_args(["serve", *flags]))


def test_event_subscribers_are_configured_by_flag() -> None:
    config = _config("--event-subscriber", "ledgerbook=https://hooks.example.test/txproc",
                     "--event-subscriber", "audit_2=http://127.0.0.1:9000/events")
    assert config.payments.event_subscribers == {
        "ledgerbook": "https://hooks.example.test/txproc",
        "audit_2": "http://127.0.0.1:9000/events"}
    assert _config().payments.event_subscribers == {}


@pytest.mark.parametrize("bad", [
    "no-url", "=http://x.test/", "sp ace=http://x.test/", "name=ftp://x.test/",
])
def test_a_malformed_subscriber_is_refused_by_name(bad: str) -> None:
    with pytest.raises(SystemExit, match="--event-subscriber"):
        _config("--event-subscriber", bad)


def test_a_subscriber_named_twice_is_refused() -> None:
    with pytest.raises(SystemExit, match="used once"):
        _config("--event-subscriber", "a=http://x.test/1", "--event-subscriber",
                "a=http://x.test/2")


def test_quota_and_signed_requests_reach_the_front() -> None:
    front = _config("--max-accounts-per-tenant", "7", "--require-signed-requests").front
    assert (front.accounts_per_tenant_max, front.require_signed_requests) == (7, True)


def test_a_config_never_shows_the_database_password() -> None:
    """The service's URL carries its role's password; a config printed (a log line, a
    traceback) must not."""
    from processor.config import FrontConfig, ShardConfig

    shard = ShardConfig(database_url="postgresql://txproc_app:pw-not-shown@/db?host=/s",
                        shards=2)
    config = Config(shard=shard, front=FrontConfig(), data_dir="/data")
    assert "pw-not-shown" not in repr(config) and "pw-not-shown" not in str(shard)
    assert "txproc_app:***@" in repr(shard) and "shards=2" in repr(shard)
    assert shard.database_url.endswith("@/db?host=/s")  # the value itself is untouched


def test_the_payments_cpu_nice_is_configured_by_flag() -> None:
    assert _config().payments.cpu_nice == 19
    assert _config("--payments-cpu-nice", "0").payments.cpu_nice == 0
    assert _config("--provider", "acme", "--payments-cpu-nice", "7").payments.cpu_nice == 7
    with pytest.raises(SystemExit, match="--payments-cpu-nice"):
        _config("--payments-cpu-nice", "20")
