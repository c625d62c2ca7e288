"""The ``txproc`` command: serve, migrate, verify, token issue, certs dev, demo.

This is the composition root: the only place that reads the environment and the only
module of ``processor`` that reaches into ``actors`` (imported inside the commands, so the
domain core stays importable without Ray).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from processor.config import (
    Config,
    FrontConfig,
    ObservabilityConfig,
    PaymentsSection,
    ProviderEndpoint,
    RetentionConfig,
    ShardConfig,
)
from processor.identity import (
    DEFAULT_TENANT,
    KEYS_FILE_NAME,
    SCOPES,
    TOKEN_TTL_S_DEFAULT,
    TOKEN_TTL_S_MAX,
    KeyFileError,
    issue_token,
)
from processor.privacy import MasterKey

__all__ = ["build_config", "main", "verify_summary"]

log = logging.getLogger("txproc")
DATA_DIR_DEFAULT = "./var/txproc"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=os.environ.get("TXPROC_DATA_DIR", DATA_DIR_DEFAULT),
                   help="where the embedded database and the signing key live")
    p.add_argument("--database-url", default=os.environ.get("TXPROC_DATABASE_URL", ""),
                   action=_DatabaseUrls,
                   help="an existing PostgreSQL instead of the embedded one: a URL of the "
                        "role that owns the tables (migrations and operator commands use it; "
                        "the service connects as txproc_app, its password kept in "
                        "<data-dir>/txproc_app.pgpass). Given again, each further URL is "
                        "another database for the ledger's shards (db1, db2, ...; shards are "
                        "dealt over main and these; docs/operations.md, 'Adding a database')")


class _DatabaseUrls(argparse.Action):
    """``--database-url``: the first names the main database (replacing the environment's
    default), each further one a database of the ledger's shards (``database_urls_more``)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        more = getattr(namespace, "database_urls_more", None)
        if more is None:  # the first: replaces the default
            namespace.database_url = values
            namespace.database_urls_more = []
        else:
            more.append(values)


def further_databases(args: argparse.Namespace) -> dict[str, str]:
    """The ledger's further databases by key (db1, db2, ...), from repeated --database-url."""
    more = getattr(args, "database_urls_more", None) or []
    if more and not args.database_url:
        raise SystemExit("txproc: --database-url: further databases need a first one")
    return {f"db{i}": url for i, url in enumerate(more, start=1)}


def _add_key_file(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--key-file", default=os.environ.get("TXPROC_KEY_FILE", ""), metavar="FILE",
                   help=f"the token key ring ({KEYS_FILE_NAME}) to {what}, instead of the one "
                        "in --data-dir: the same file (or a copy of one Secret) on every "
                        "node of a cluster")


def _key_directory(args: argparse.Namespace) -> Path:
    """The directory of the key ring the command uses: --key-file's, else --data-dir.
    Raises ``KeyFileError`` if --key-file does not name a ring's file."""
    if not args.key_file:
        return Path(args.data_dir).resolve()
    # absolute(), not resolve(): the ring's file must not be a symbolic link, and resolving
    # it would hide one from the check that refuses it.
    path = Path(args.key_file).absolute()
    if path.name != KEYS_FILE_NAME:
        raise KeyFileError(f"--key-file {path}: a key ring's file is named {KEYS_FILE_NAME} "
                           "(its directory also holds the lock its changes take)")
    return path.parent


def _add_serve(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    p.add_argument("--retain-hot-months", type=int, default=0, metavar="N",
                   help="archive, on a schedule and under a lease (one process of the "
                        "cluster), the months older than the current one and the N before "
                        "it, as `txproc archive --retain-hot-months N` would (0: off; "
                        "docs/operations.md, 'Archive and restore')")
    p.add_argument("--archive-dir", default="", metavar="DIR",
                   help="where the scheduled archives go (default <data-dir>/archives)")
    p.add_argument("--archive-interval-s", type=float, default=3_600.0,
                   help="how often the schedule looks for a month to archive")
    _add_key_file(p, "verify tokens with; it must exist (`txproc keys rotate --key-file` "
                     "makes one)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, default=8080)
    p.add_argument("--rpc-port", type=int, default=7070)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--fronts", type=int, default=0, metavar="N",
                   help="start N fronts on this node, on consecutive ports (tests, "
                        "development); 0, the default, starts one per Ray node")
    front = FrontConfig()
    p.add_argument("--rate-limit-rps", type=float, default=front.rate_limit_rps,
                   help="operations per second per principal (a batch counts its items); "
                        "0 disables")
    p.add_argument("--rate-limit-burst", type=int, default=front.rate_limit_burst,
                   help="operations a principal may send at once before the rate applies")
    p.add_argument("--require-signed-requests", action="store_true",
                   help="refuse state-changing HTTP requests not signed with a client key "
                        "(RFC 9421; `txproc keys create-client`); signed ones are verified "
                        "either way")
    p.add_argument("--max-accounts-per-tenant", type=int,
                   default=front.accounts_per_tenant_max, metavar="N",
                   help="the most accounts one tenant may hold (the processor's own not "
                        "counted); 0 sets no quota")
    p.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS") or None,
                   help="join this Ray cluster instead of starting a local Ray")
    p.add_argument("--metrics-port", type=int, default=9464,
                   help="Prometheus scrape endpoint of each node (GET /metrics); 0 picks one")
    p.add_argument("--vcpu-hour-price", type=float, default=0.04,
                   help="price of a vCPU-hour, for txproc_cost_per_transfer (USD)")
    p.add_argument("--trace-exporter", choices=("off", "console", "otlp"), default="off",
                   help="where traces go (off costs nothing on the hot path)")
    p.add_argument("--otlp-endpoint", default=os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
                   help="OTLP/HTTP endpoint for --trace-exporter otlp")
    p.add_argument("--trace-sample-ratio", type=float, default=1.0)
    p.add_argument("--provider", action="append", default=[], metavar="NAME[=URL[,SECRETS]]",
                   help="a payment provider (repeatable; replaces the defaults acme and "
                        "globex): with a URL, that provider's server and its secrets file; "
                        "without, its simulated server is started")
    p.add_argument("--no-payments", action="store_true",
                   help="serve the ledger only: no providers, no payments API")
    p.add_argument("--recon-every-s", type=float, default=86_400.0, metavar="S",
                   help="reconcile each provider's settlement reports every S seconds (and "
                        "at start) for the days up to yesterday not yet reconciled; 0: "
                        "only when asked (docs/reconciliation.md)")
    p.add_argument("--payments-cpu-nice", type=int, default=19, metavar="N",
                   help="the nice value (0-19) of the payments, provider and risk actors "
                        "and of payments' database sessions, so that on a shared node they "
                        "yield the CPU to this deployment's ledger; 0 where two deployments "
                        "share a machine (actors/priority.py)")
    p.add_argument("--event-subscriber", action="append", default=[], metavar="NAME=URL",
                   help="deliver every payment and payout event, signed, at least once, to "
                        "this URL (repeatable); subscribers not named are deactivated")


def _add_tls(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", default="", metavar="FILE",
                   help="serve HTTPS and RPC over TLS (1.2 or later) with this certificate "
                        "chain (PEM); needs --tls-key")
    p.add_argument("--tls-key", default="", metavar="FILE",
                   help="the private key of --tls-cert (PEM, unencrypted)")
    p.add_argument("--client-ca", default="", metavar="FILE",
                   help="CA certificates (PEM) that client certificates are verified against")
    p.add_argument("--require-client-cert", action="store_true",
                   help="refuse, during the handshake, every client without a certificate "
                        "signed by --client-ca (mutual TLS)")
    p.add_argument("--server-ca", default="", metavar="FILE",
                   help="the CA (PEM) that signed --tls-cert, which the processor's own "
                        "clients (payments, simulated providers' webhooks) verify it with; "
                        "default: the system's trust store")
    p.add_argument("--internal-client-cert", default="", metavar="FILE",
                   help="the client certificate (PEM) the processor's own clients present "
                        "under --require-client-cert; needs --internal-client-key")
    p.add_argument("--internal-client-key", default="", metavar="FILE",
                   help="the private key of --internal-client-cert (PEM)")


def _absolute(path: str) -> str:
    """``path`` made absolute here: the actors that open it run in other directories."""
    return str(Path(path).resolve()) if path else ""


def build_config(args: argparse.Namespace) -> Config:
    """The one config tree, from parsed arguments (and the environment, via defaults)."""
    config = Config(
        shard=ShardConfig(database_url=args.database_url, shards=args.shards,
                          databases=further_databases(args)),
        front=FrontConfig(host=args.host, http_port=args.http_port, rpc_port=args.rpc_port,
                          key_path=str(Path(args.key_file).absolute()) if args.key_file else "",
                          rate_limit_rps=args.rate_limit_rps,
                          rate_limit_burst=args.rate_limit_burst,
                          require_signed_requests=args.require_signed_requests,
                          accounts_per_tenant_max=args.max_accounts_per_tenant,
                          tls_cert_path=_absolute(args.tls_cert),
                          tls_key_path=_absolute(args.tls_key),
                          tls_client_ca_path=_absolute(args.client_ca),
                          tls_require_client_cert=args.require_client_cert,
                          tls_server_ca_path=_absolute(args.server_ca),
                          tls_internal_cert_path=_absolute(args.internal_client_cert),
                          tls_internal_key_path=_absolute(args.internal_client_key)),
        data_dir=str(Path(args.data_dir).resolve()),
        ray_address=args.ray_address,
        fronts=getattr(args, "fronts", 0),
        payments=_payments(args),
        observability=ObservabilityConfig(
            metrics_port=args.metrics_port, vcpu_hour_price=args.vcpu_hour_price,
            trace_exporter=args.trace_exporter, otlp_endpoint=args.otlp_endpoint,
            trace_sample_ratio=args.trace_sample_ratio),
        retention=_retention(args),
    )
    config.check()
    return config


def _retention(args: argparse.Namespace) -> RetentionConfig:
    """``--retain-hot-months``, ``--archive-dir``, ``--archive-interval-s``."""
    months = getattr(args, "retain_hot_months", 0)
    directory = getattr(args, "archive_dir", "") or str(
        Path(args.data_dir).resolve() / "archives")
    try:
        return RetentionConfig(hot_months=months, directory=directory,
                               interval_s=getattr(args, "archive_interval_s", 3_600.0))
    except ValueError as exc:
        raise SystemExit(f"txproc: {exc}") from exc


def _payments(args: argparse.Namespace) -> PaymentsSection:
    """The payments section from ``--provider``, ``--event-subscriber`` and
    ``--no-payments``."""
    if args.no_payments:
        return PaymentsSection(enabled=False, providers=())
    subscribers = _subscribers(args.event_subscriber)
    if not 0 <= args.recon_every_s <= 30 * 86_400:
        raise SystemExit("txproc: --recon-every-s must be from 0 (off) to 2592000 (30 days)")
    nice = getattr(args, "payments_cpu_nice", 19)
    if not 0 <= nice <= 19:
        raise SystemExit("txproc: --payments-cpu-nice must be from 0 to 19")
    if not args.provider:
        return PaymentsSection(event_subscribers=subscribers, recon_every_s=args.recon_every_s,
                               cpu_nice=nice)
    endpoints = []
    for text in args.provider:
        name, _, rest = text.partition("=")
        url, _, secrets = rest.partition(",")
        if url and not secrets:
            raise SystemExit(f"txproc: --provider {name}: a URL needs its secrets file "
                             "(NAME=URL,SECRETS)")
        endpoints.append(ProviderEndpoint(name=name.strip(), base_url=url.strip(),
                                          secrets_file=secrets.strip()))
    order = tuple(e.name for e in endpoints)
    defaults = PaymentsSection()
    return PaymentsSection(providers=tuple(endpoints), event_subscribers=subscribers,
                           rules=msgspec.structs.replace(defaults.rules, provider_order=order),
                           recon_every_s=args.recon_every_s, cpu_nice=nice)


def _subscribers(texts: list[str]) -> dict[str, str]:
    """``NAME=URL`` pairs of ``--event-subscriber``: a name of letters, digits, ``-`` or
    ``_``, once each, and an http(s) URL."""
    subscribers: dict[str, str] = {}
    for text in texts:
        name, _, url = text.partition("=")
        name, url = name.strip(), url.strip()
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name) or name in subscribers or not (
                url.startswith(("http://", "https://"))):
            raise SystemExit(f"txproc: --event-subscriber {text!r}: NAME=URL, a name of "
                             "letters, digits, - or _ used once, and an http(s) URL")
        if name.lower().startswith("we_"):
            raise SystemExit(f"txproc: --event-subscriber {text!r}: names starting with we_ "
                             "are tenants' webhook endpoints (txproc webhooks)")
        subscribers[name] = url
    return subscribers


def _add_token_revoke(token_sub: Any) -> None:
    revoke = token_sub.add_parser(
        "revoke", help="refuse a token, or every token of a principal issued until now, on "
                       "every front within a second")
    revoke.add_argument("--jti", default="", help="the token id (its jti claim)")
    revoke.add_argument("--tenant", default="", help="with --subject: the principal's tenant")
    revoke.add_argument("--subject", default="",
                        help="with --tenant: every token of this subject issued up to now")
    revoke.add_argument("--ttl-s-max", type=int, default=TOKEN_TTL_S_MAX,
                        help="how long the revocation is kept: the longest lifetime tokens "
                             "are issued with (default 24 h)")
    _add_common(revoke)


def _add_keys(sub: Any) -> None:
    keys = sub.add_parser("keys", help="the token-signing keys of a data directory, and the "
                                       "client keys that sign HTTP requests")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    data_dir = os.environ.get("TXPROC_DATA_DIR", DATA_DIR_DEFAULT)
    rotate = keys_sub.add_parser(
        "rotate", help="add a new active key and print its id; the keys before still verify "
                       "until retired")
    rotate.add_argument("--data-dir", default=data_dir)
    retire = keys_sub.add_parser(
        "retire", help="stop verifying tokens of a key (not the active one)")
    retire.add_argument("kid", help="the key's id, as `txproc keys list` shows it")
    retire.add_argument("--data-dir", default=data_dir)
    listing = keys_sub.add_parser("list", help="the keys' ids, states and dates (no secrets)")
    listing.add_argument("--data-dir", default=data_dir)
    for ring_command in (rotate, retire, listing):
        _add_key_file(ring_command, "change or list (made by the first rotate)")
    for changes in (rotate, retire):
        changes.add_argument(
            "--database-url", default=os.environ.get("TXPROC_DATABASE_URL", ""),
            help="where the change is recorded as an audit event (the server's, as for "
                 "`txproc serve`); without it, the embedded database of --data-dir if it "
                 "has one and is not in use")
    create_client = keys_sub.add_parser(
        "create-client", help="a client key that signs one principal's HTTP requests "
                              "(RFC 9421); prints its id and secret as JSON, once")
    create_client.add_argument("--tenant", required=True, help="the principal's tenant")
    create_client.add_argument("--subject", required=True,
                               help="the principal: the subject of the tokens it is used with")
    _add_common(create_client)
    revoke_client = keys_sub.add_parser(
        "revoke-client", help="refuse a client key's signatures on every front within a second")
    revoke_client.add_argument("key_id", help="the key's id (key_id of create-client)")
    _add_common(revoke_client)


def _add_webhooks(sub: Any) -> None:
    webhooks = sub.add_parser(
        "webhooks", help="tenants' webhook endpoints, as POST/GET/DELETE /v1/webhook_endpoints "
                         "manage them (docs/payments.md)")
    webhooks_sub = webhooks.add_subparsers(dest="webhooks_command", required=True)
    add = webhooks_sub.add_parser(
        "add", help="send a tenant's payment and payout events to a URL; prints the endpoint "
                    "with its signing secret as JSON, once")
    add.add_argument("--tenant", required=True, help="the tenant whose events it receives")
    add.add_argument("--url", required=True, help="an http(s) URL without credentials")
    add.add_argument("--events", default="",
                     help="comma-separated event types (payment.captured,...); every type "
                          "when left out")
    _add_common(add)
    listing = webhooks_sub.add_parser("list", help="a tenant's endpoints as JSON lines, "
                                                   "newest first (no secrets)")
    listing.add_argument("--tenant", required=True)
    _add_common(listing)
    remove = webhooks_sub.add_parser(
        "remove", help="stop sending to an endpoint (any tenant's) and drop its deliveries "
                       "not yet made")
    remove.add_argument("endpoint_id", help="the endpoint's id (we_...)")
    _add_common(remove)


def _add_erase(sub: Any) -> None:
    erase = sub.add_parser(
        "erase", help="erase one data subject of a tenant everywhere the processor stores "
                      "it: its key destroyed, its sealed fields cleared, its events and "
                      "stored answers scrubbed; amounts, ids and times stay (docs/design.md "
                      "§17, docs/operations.md)")
    erase.add_argument("--tenant", required=True, help="the tenant's name")
    erase.add_argument("--subject-ref", required=True,
                       help="the customer_ref its payments and payouts named, or the "
                            "user_data value of a tenant that marks user_data personal")
    erase.add_argument("--master-key-file", default="", metavar="FILE",
                       help="the master key (default: erasure.key in the server's key "
                            "directory, --key-file's or --data-dir)")
    _add_key_file(erase, "find the server's key directory by (erasure.key is beside it)")
    _add_common(erase)


def _add_tenants(sub: Any) -> None:
    tenants = sub.add_parser("tenants", help="settings of a tenant")
    tenants_sub = tenants.add_subparsers(dest="tenants_command", required=True)
    personal = tenants_sub.add_parser(
        "personal-user-data",
        help="from now on, keep the tenant's user_data as personal data: the ledger stores "
             "a pseudonym, the value is sealed with its subject's key, and `txproc erase "
             "--subject-ref VALUE` erases it (every front within 5 s; it cannot be undone; "
             "docs/design.md §17)")
    personal.add_argument("--tenant", required=True, help="the tenant's name")
    _add_common(personal)


def _add_archive(sub: Any) -> None:
    archive = sub.add_parser(
        "archive", help="export the closed months before --before to Parquet files with a "
                        "manifest, check them, record a balance checkpoint, then delete their "
                        "transfers and resolutions; given several --database-url, a part per "
                        "database (docs/operations.md, 'Archive and restore')")
    when = archive.add_mutually_exclusive_group(required=True)
    when.add_argument("--before", metavar="YYYY-MM",
                      help="the first month kept: everything before its first instant (UTC) "
                           "is archived")
    when.add_argument("--retain-hot-months", type=int, metavar="N",
                      help="keep the current month and the N whole months before it; archive "
                           "what is older and not archived yet (for a timer: exits 0 when "
                           "there is nothing new to archive)")
    archive.add_argument("--to", default="archives", metavar="DIR",
                         help="where the archive's directory is made (default ./archives)")
    _add_common(archive)
    restore = sub.add_parser(
        "restore", help="put an archive's rows back after checking its manifest, its files' "
                        "checksums and its record (newest archive first); each part of an "
                        "archive of several databases into its own")
    restore.add_argument("archive_dir", metavar="ARCHIVE_DIR",
                         help="the directory `txproc archive` made (holds manifest.json)")
    _add_common(restore)


def _add_recon(sub: Any) -> None:
    recon = sub.add_parser("recon", help="settlement reconciliation (docs/reconciliation.md)")
    recon_sub = recon.add_subparsers(dest="recon_command", required=True)
    run = recon_sub.add_parser(
        "run", help="ask the running server to reconcile a provider's report of a day now, "
                    "and print what it found; exit 0 when the run succeeded")
    run.add_argument("--provider", required=True)
    run.add_argument("--date", required=True, help="the day, YYYY-MM-DD (UTC)")
    run.add_argument("--data-dir", default=os.environ.get("TXPROC_DATA_DIR", DATA_DIR_DEFAULT),
                     help="the server's data directory: its API address (api.json, written "
                          "by serve) and the key that signs this command's token")
    run.add_argument("--url", default="",
                     help="the server's API instead of the one recorded in --data-dir")
    run.add_argument("--token", default=os.environ.get("TXPROC_TOKEN", ""),
                     help="a bearer token with reconciliation:write (default: one signed "
                          "here with the data directory's key, for the OS user)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="txproc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the processor in the foreground")
    _add_serve(serve)
    _add_tls(serve)
    demo = sub.add_parser("demo", help="start on embedded defaults and drive a workload")
    _add_serve(demo)
    # The demo's own clients speak plain TCP.
    demo.set_defaults(http_port=0, rpc_port=0, metrics_port=0, tls_cert="", tls_key="",
                      client_ca="", require_client_cert=False, server_ca="",
                      internal_client_cert="", internal_client_key="")
    demo.add_argument("--accounts", type=int, default=1_000)
    demo.add_argument("--transfers", type=int, default=200_000)
    demo.add_argument("--batch", type=int, default=4_000)
    migrate = sub.add_parser("migrate", help="apply database migrations and exit")
    _add_common(migrate)
    verify = sub.add_parser(
        "verify", help="check the whole ledger from one snapshot, live: balances re-derived "
                       "from transfers, currencies balanced, holds resolved once, every "
                       "hash-chain link and anchor, the audit log's chain, and that "
                       "reconciliation records name real transfers (docs/design.md §15)")
    _add_common(verify)
    verify.add_argument("--json", action="store_true",
                        help='print {"ok", "rows_per_s", "checked", "problems": [...]}')
    move = sub.add_parser(
        "move-shard", help="move one shard's rows to another database of the ledger, with "
                           "the processor stopped (docs/operations.md, 'Adding a database')")
    _add_common(move)
    move.add_argument("--shard", type=int, required=True, help="the shard to move")
    move.add_argument("--to", required=True, metavar="KEY",
                      help="the database to move it to: db1, db2, ... (the further "
                           "--database-url in order), or main")
    audit = sub.add_parser(
        "audit", help="who made an account, transfer or payment step (--account, --transfer, "
                      "--payment); `audit list`: the audit events of operator and "
                      "configuration actions")
    _add_common(audit)
    # `txproc audit list` reads the audit events; `txproc audit --transfer ID` (no word)
    # reads who made an object, as before the events existed.
    audit.add_argument("listing", nargs="?", choices=["list"],
                       help="list the audit events as JSON lines, oldest first")
    which_object = audit.add_mutually_exclusive_group()
    for kind in ("account", "transfer", "payment"):
        which_object.add_argument(f"--{kind}", metavar="ID",
                                  help=f"the {kind}'s id" + (" (or a payout's)"
                                                             if kind == "payment" else ""))
    audit.add_argument("--action", default=None,
                       help="with list: only this action (e.g. keys.rotated)")
    audit.add_argument("--after", type=int, default=0,
                       help="with list: only events after this id")
    audit.add_argument("--limit", type=int, default=None,
                       help="with list: at most this many events (all by default)")
    dlq = sub.add_parser("dlq", help="payment events that could not be delivered")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    dlq_list = dlq_sub.add_parser("list", help="show dead letters not yet replayed")
    _add_common(dlq_list)
    dlq_list.add_argument("--limit", type=int, default=100)
    replay = dlq_sub.add_parser("replay", help="deliver dead letters again")
    _add_common(replay)
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every dead letter not yet replayed")
    which.add_argument("--event-id", type=int, action="append", dest="event_ids",
                       help="this event's dead letters (repeatable)")
    payments = sub.add_parser("payments", help="payment steps that need an operator")
    payments_sub = payments.add_subparsers(dest="payments_command", required=True)
    review = payments_sub.add_parser(
        "review", help="steps set aside as requires_review (docs/runbooks/requires-review.md)")
    review_sub = review.add_subparsers(dest="review_command", required=True)
    review_list = review_sub.add_parser("list", help="the steps in review, oldest first")
    _add_common(review_list)
    retry = review_sub.add_parser(
        "retry", help="hand a step back to the recovery worker, due now, its backoff reset")
    retry.add_argument("step_id", type=int)
    retry.add_argument("--operator", required=True,
                       help="who decides this (recorded in the step's log)")
    retry.add_argument("--reason", required=True, help="why (recorded in the step's log)")
    _add_common(retry)
    _add_webhooks(sub)
    _add_recon(sub)
    _add_erase(sub)
    _add_tenants(sub)
    _add_archive(sub)
    token = sub.add_parser("token", help="bearer tokens for local use")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    issue = token_sub.add_parser("issue", help="print a signed token")
    issue.add_argument("--scopes", required=True,
                       help=f"comma-separated, from: {','.join(SCOPES)}")
    issue.add_argument("--ttl-s", type=int, default=TOKEN_TTL_S_DEFAULT,
                       help="lifetime in seconds, at most --ttl-s-max")
    issue.add_argument("--ttl-s-max", type=int, default=TOKEN_TTL_S_MAX,
                       help="the cap on --ttl-s (default 24 h): `token revoke` keeps a "
                            "revocation this long by default, so raise it knowingly")
    issue.add_argument("--tenant", default=DEFAULT_TENANT,
                       help="the tenant (client platform) whose accounts the token moves")
    issue.add_argument("--subject", default="local",
                       help="the principal within the tenant (recorded with what it does)")
    issue.add_argument("--data-dir", default=os.environ.get("TXPROC_DATA_DIR", DATA_DIR_DEFAULT))
    _add_key_file(issue, "sign with; it must exist")
    _add_token_revoke(token_sub)
    _add_keys(sub)
    certs = sub.add_parser("certs", help="TLS certificates for local use")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True)
    dev = certs_sub.add_parser(
        "dev", help="write a development CA, a server certificate for localhost and "
                    "127.0.0.1, and a client certificate, with their keys")
    dev.add_argument("--out", required=True, metavar="DIR", help="where to write them")
    dev.add_argument("--force", action="store_true", help="replace files that exist")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("serve", "demo"):
        from actors.ops.telemetry import setup

        # JSON lines carrying trace ids, redacted (actors/ops/telemetry.py); the demo keeps the
        # terminal for its tables and logs only warnings.
        setup(build_config(args).observability, "serve" if args.command == "serve" else "demo",
              level=logging.INFO if args.command == "serve" else logging.WARNING)
    else:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency; stdlib asyncio still works
        pass
    if args.command == "token":
        if args.token_command == "revoke":  # noqa: S105 - a subcommand's name, not a password
            return asyncio.run(_token_revoke(args))
        return _token_issue(args)
    if args.command == "keys":
        if args.keys_command in ("create-client", "revoke-client"):
            return _client_keys(args)
        return _keys(args)
    if args.command == "certs":
        return _certs_dev(args)
    if args.command == "migrate":
        return asyncio.run(_migrate(args))
    if args.command == "verify":
        return asyncio.run(_verify(args))
    if args.command == "move-shard":
        return asyncio.run(_move_shard(args))
    if args.command == "dlq":
        return asyncio.run(_dlq(args))
    if args.command == "payments":
        return asyncio.run(_payments_review(args))
    if args.command == "webhooks":
        return _webhooks_in_data_dir(args)
    if args.command == "audit":
        return asyncio.run(_audit(args))
    if args.command == "recon":
        return _recon_run(args)
    if args.command == "erase":
        return _erase(args)
    if args.command == "tenants":
        return asyncio.run(_tenants(args))
    if args.command in ("archive", "restore"):
        return asyncio.run(_archive_or_restore(args))
    if args.command == "serve":
        return asyncio.run(_serve(build_config(args)))
    if args.command == "demo":
        from actors.app.demo import run_demo

        return asyncio.run(run_demo(build_config(args), accounts=args.accounts,
                                    transfers=args.transfers, batch=args.batch))
    return 2


def _token_issue(args: argparse.Namespace) -> int:
    from processor.identity import load_or_create_ring

    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    try:
        data_dir = _key_directory(args)
    except KeyFileError as exc:
        print(f"txproc token issue: {exc}", file=sys.stderr)
        return 2
    if args.key_file and not (data_dir / KEYS_FILE_NAME).exists():
        # A key ring named by --key-file is the one the servers share: never made here.
        print(f"txproc token issue: the key file {data_dir / KEYS_FILE_NAME} does not exist; "
              "make it with `txproc keys rotate --key-file`", file=sys.stderr)
        return 2
    if not data_dir.is_dir():
        # A mistyped directory would otherwise get a new key, and the token would be
        # refused by the server that uses the real one.
        print(f"txproc token issue: the data directory {data_dir} does not exist; start "
              "`txproc serve` with it first, or name the server's --data-dir",
              file=sys.stderr)
        return 2
    try:
        # Signed with the ring's active key (made from jwt.key the first time).
        ring = load_or_create_ring(data_dir, now_s=int(time.time()))
        print(issue_token(ring.active.secret, scopes, ttl_s=args.ttl_s,
                          now_s=int(time.time()), tenant=args.tenant, subject=args.subject,
                          ttl_s_max=args.ttl_s_max))
    except ValueError as exc:  # KeyFileError (a refused key file) is one too
        print(f"txproc token issue: {exc}", file=sys.stderr)
        return 2
    return 0


def _certs_dev(args: argparse.Namespace) -> int:
    import datetime

    from actors.app.certs import DevFilesExist, write_dev_certs

    out = Path(args.out).resolve()
    try:
        written = write_dev_certs(out, now=datetime.datetime.now(datetime.UTC),
                                  force=args.force)
    except DevFilesExist as exc:
        print(f"txproc certs dev: {exc}; nothing written (--force replaces them)",
              file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"txproc certs dev: {exc}", file=sys.stderr)
        return 2
    for path, file in written:
        print(f"wrote {path} ({'0600, ' if file.secret else ''}{file.what})")
    print(f"serve with: txproc serve --tls-cert {out / 'server.pem'} "
          f"--tls-key {out / 'server-key.pem'} --client-ca {out / 'ca.pem'} "
          f"--require-client-cert --server-ca {out / 'ca.pem'} "
          f"--internal-client-cert {out / 'client.pem'} "
          f"--internal-client-key {out / 'client-key.pem'}")
    return 0


def _keys(args: argparse.Namespace) -> int:
    from processor.identity import load_or_create_key, load_or_create_ring, retire_key, rotate_key
    from processor.privacy import MASTER_KEY_FILE_NAME

    command = f"txproc keys {args.keys_command}"
    try:
        data_dir = _key_directory(args)
    except KeyFileError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return 2
    if not data_dir.is_dir():
        what = "key file's directory" if args.key_file else "data directory"
        print(f"{command}: the {what} {data_dir} does not exist; name the server's "
              f"{'--key-file' if args.key_file else '--data-dir'}", file=sys.stderr)
        return 2
    now_s = int(time.time())
    try:
        if args.keys_command == "rotate":
            ring = rotate_key(data_dir, now_s=now_s)
            if args.key_file:
                # A shared key directory gets its erasure master key here too: the servers
                # only read it (actors/payments/actor.py), so every node has the same one.
                load_or_create_key(data_dir / MASTER_KEY_FILE_NAME)
            print(ring.active.kid)
            print(f"{command}: {ring.active.kid} signs from now on; every front verifies with "
                  "it within a second, and the keys before verify until retired",
                  file=sys.stderr)
            _record_key_change(args, "keys.rotated", ring.active.kid,
                               {"keys": len(ring.keys)})
        elif args.keys_command == "retire":
            retire_key(data_dir, args.kid, now_s=now_s)
            print(f"{command}: tokens of {args.kid} are refused on every front within a "
                  "second", file=sys.stderr)
            _record_key_change(args, "keys.retired", args.kid, {})
        else:
            for key in load_or_create_ring(data_dir, now_s=now_s).keys:
                retired = f" retired {_utc(key.retired_at_s)}" if key.retired_at_s else ""
                print(f"{key.kid} {key.state} created {_utc(key.created_at_s)}{retired}")
    except ValueError as exc:  # KeyRingError (a refused change), KeyFileError
        print(f"{command}: {exc}", file=sys.stderr)
        return 2
    return 0


def _utc(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


# One id for every audit event a command writes, so an operator's one command is one request.
_CLI_REQUEST_ID = f"cli-{os.getpid()}-{time.time_ns():x}"


async def _audit_event(conn: Any, action: str, target_kind: str, target_id: str, *,
                       tenant_slot: int = 0, details: dict[str, Any] | None = None) -> None:
    """Record what this command did as an audit event of the operating-system user running
    it (actors/ops/audit_events.py), in ``conn``'s transaction."""
    from actors.ops import operator_actor, record_audit_event

    await record_audit_event(conn, actor=operator_actor(), action=action,
                             target_kind=target_kind, target_id=target_id,
                             tenant_slot=tenant_slot, details=details,
                             request_id=_CLI_REQUEST_ID)


def _record_key_change(args: argparse.Namespace, action: str, kid: str,
                       details: dict[str, Any]) -> None:
    """Record a key ring change (made in the key file already) as an audit event in the
    server's database: ``--database-url``, or the embedded one of the data directory when
    it has one that no server holds. When neither can be reached the change stands and is
    said to be unrecorded (docs/security.md, "Audit events")."""
    import asyncpg

    from actors.database import EmbeddedPostgresError

    command = f"txproc keys {args.keys_command}"
    if not args.database_url and not (Path(args.data_dir) / "pg" / "PG_VERSION").exists():
        print(f"{command}: not recorded as an audit event: no database (name the server's "
              "with --database-url)", file=sys.stderr)
        return

    async def record() -> None:
        with _operator_database(args) as url:
            conn = await asyncpg.connect(url, timeout=10)
            try:
                await _audit_event(conn, action, "signing_key", kid, details=details)
            finally:
                await conn.close()

    try:
        asyncio.run(record())
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, EmbeddedPostgresError,
            TimeoutError) as exc:
        print(f"{command}: not recorded as an audit event: {exc!r}", file=sys.stderr)


@contextlib.contextmanager
def _operator_database(args: argparse.Namespace) -> Iterator[str]:
    """The administrative URL of the database an operator command works on:
    ``--database-url``, or the embedded server of ``--data-dir`` (as its superuser, whose
    password file is in its data directory), started for the command and stopped after."""
    from actors.app.databases import ensure_database

    config = Config(shard=ShardConfig(database_url=args.database_url, shards=1),
                    front=FrontConfig(), data_dir=str(Path(args.data_dir).resolve()))
    url, embedded = ensure_database(config)
    try:
        yield url
    finally:
        if embedded is not None:
            embedded.stop()

async def _token_revoke(args: argparse.Namespace) -> int:
    import asyncpg

    from actors.edge import revoke_subject, revoke_token_id

    by_subject = bool(args.tenant and args.subject)
    if bool(args.jti) == by_subject or (not by_subject and (args.tenant or args.subject)):
        print("txproc token revoke: name one token (--jti J) or one principal (--tenant T "
              "--subject S)", file=sys.stderr)
        return 2
    from processor.identity import tenant_slot

    with _operator_database(args) as url:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            async with conn.transaction():
                if by_subject:
                    at = await revoke_subject(conn, args.tenant, args.subject,
                                              keep_s=args.ttl_s_max)
                    what = f"every token of {args.subject} of {args.tenant} issued up to now"
                    await _audit_event(
                        conn, "token.revoked", "principal", f"{args.tenant}/{args.subject}",
                        tenant_slot=tenant_slot(args.tenant),
                        details={"tenant": args.tenant, "subject": args.subject,
                                 "issued_up_to": at.isoformat(), "keep_s": args.ttl_s_max})
                else:
                    at = await revoke_token_id(conn, args.jti, keep_s=args.ttl_s_max)
                    what = f"the token {args.jti}"
                    await _audit_event(conn, "token.revoked", "token", args.jti,
                                       details={"keep_s": args.ttl_s_max})
        except ValueError as exc:
            print(f"txproc token revoke: {exc}", file=sys.stderr)
            return 2
        except asyncpg.UndefinedTableError:
            print("txproc token revoke: the database has no revoked_tokens table; run "
                  "`txproc migrate` first", file=sys.stderr)
            return 2
        finally:
            await conn.close()
    print(f"revoked {what} at {at.isoformat()}; every front refuses it within a second")
    return 0


def _client_keys(args: argparse.Namespace) -> int:
    """``keys create-client`` / ``keys revoke-client``: client keys in the server's
    database (actors/edge/signatures.py), reached as ``token revoke`` reaches it."""
    if not args.database_url and not Path(args.data_dir).is_dir():
        # A mistyped directory would get a new embedded database that no server reads.
        print(f"txproc keys {args.keys_command}: the data directory "
              f"{Path(args.data_dir).resolve()} does not exist; name the server's "
              "--data-dir or --database-url", file=sys.stderr)
        return 2
    return asyncio.run(_write_client_key(args))


async def _write_client_key(args: argparse.Namespace) -> int:
    import base64
    import json

    import asyncpg

    from actors.edge import create_client_key, revoke_client_key
    from processor.identity import tenant_slot

    command = f"txproc keys {args.keys_command}"
    with _operator_database(args) as url:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            if args.keys_command == "create-client":
                async with conn.transaction():
                    key = await create_client_key(conn, args.tenant, args.subject)
                    await _audit_event(conn, "client_key.created", "client_key", key.key_id,
                                       tenant_slot=tenant_slot(args.tenant),
                                       details={"tenant": args.tenant,
                                                "subject": args.subject})
                print(json.dumps({"key_id": key.key_id,
                                  "secret": base64.b64encode(key.secret).decode(),
                                  "tenant": key.tenant, "subject": key.subject}))
                print(f"{command}: every front accepts its signatures within a second; the "
                      "secret is not shown again", file=sys.stderr)
                return 0
            async with conn.transaction():
                revoked_at = await revoke_client_key(conn, args.key_id)
                if revoked_at is not None:
                    owner = await conn.fetchrow(
                        "SELECT tenant, tenant_slot, subject FROM client_keys "
                        "WHERE key_id = $1", args.key_id)
                    await _audit_event(conn, "client_key.revoked", "client_key", args.key_id,
                                       tenant_slot=owner["tenant_slot"],
                                       details={"tenant": owner["tenant"],
                                                "subject": owner["subject"]})
        except ValueError as exc:
            print(f"{command}: {exc}", file=sys.stderr)
            return 2
        except asyncpg.UndefinedTableError:
            print(f"{command}: the database has no client_keys table; run `txproc migrate` "
                  "first", file=sys.stderr)
            return 2
        finally:
            await conn.close()
    if revoked_at is None:
        print(f"{command}: no client key {args.key_id} is in use", file=sys.stderr)
        return 1
    print(f"revoked {args.key_id} at {revoked_at.isoformat()}; every front refuses its "
          "signatures within a second")
    return 0


async def _migrate(args: argparse.Namespace) -> int:
    import asyncpg

    from actors.migrate import migrate

    with _operator_database(args) as url:
        applied = await migrate(url)
        if applied:
            conn = await asyncpg.connect(url, timeout=10)
            try:
                await _audit_event(conn, "schema.migrated", "schema", str(max(applied)),
                                   details={"applied": applied})
            finally:
                await conn.close()
        print(f"applied: {applied or 'nothing (up to date)'}")
    for key, url in further_databases(args).items():
        applied = await migrate(url)
        print(f"{key}: applied: {applied or 'nothing (up to date)'}")
    return 0


@contextlib.contextmanager
def _live_database(args: argparse.Namespace) -> Iterator[str]:
    """Like ``_operator_database``, but when the embedded server of ``--data-dir`` already
    runs (a live ``txproc serve``), its URL, reached through the socket its
    ``postmaster.pid`` names, instead of starting a second server on the same data."""
    from urllib.parse import quote

    from actors.database import PORT, SUPERUSER, SUPERUSER_PASSWORD_FILE_NAME

    data_dir = Path(args.data_dir).resolve() / "pg"
    lines = []
    with contextlib.suppress(OSError):
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
    running = False
    if not args.database_url and len(lines) >= 5 and lines[0].strip().isdigit():
        try:
            os.kill(int(lines[0]), 0)
            running = True
        except PermissionError:  # the server runs as another user (root starts it so)
            running = True
        except OSError:
            running = False
    if not running:
        with _operator_database(args) as url:
            yield url
        return
    host = quote(lines[4].strip(), safe="/")
    passfile = quote(str(data_dir / SUPERUSER_PASSWORD_FILE_NAME), safe="/")
    yield f"postgresql://{SUPERUSER}@/{SUPERUSER}?host={host}&port={PORT}&passfile={passfile}"


async def _verify(args: argparse.Namespace) -> int:
    """``txproc verify``: every check (actors/app/verification.py: the ledger, the audit
    log, the reconciliation records) over one snapshot; exit 0 when everything holds, 1
    naming the first broken thing, 2 if it cannot read."""
    import asyncpg

    from actors.app.verification import verify_databases

    with _live_database(args) as url:
        try:
            result = await verify_databases({"main": url, **further_databases(args)})
        except (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError) as exc:
            print(f"txproc verify: {exc}; run `txproc migrate` first", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(result.as_json(), sort_keys=True))
    else:
        print(verify_summary(result))
    return 0 if result.report.ok else 1


async def _move_shard(args: argparse.Namespace) -> int:
    """``txproc move-shard``: exit 0 when the shard moved, 1 when refused (the message says
    why, with a stable code; nothing was written), 2 when a database is not migrated."""
    import asyncpg

    from actors.ledger.relocation import MoveRefused, move_shard

    with _operator_database(args) as url:
        urls = {"main": url, **further_databases(args)}
        try:
            moved = await move_shard(urls, args.shard, args.to)
        except MoveRefused as exc:
            print(f"txproc move-shard: refused: {exc}", file=sys.stderr)
            return 2 if exc.code == "not_migrated" else 1
        except (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError) as exc:
            print(f"txproc move-shard: {exc}; run `txproc migrate` first", file=sys.stderr)
            return 2
        conn = await asyncpg.connect(url, timeout=10)
        try:
            await _audit_event(conn, "ledger.shard_moved", "shard", str(moved.shard),
                               details={"from": moved.source, "to": moved.target,
                                        "rows": moved.rows, "resumed": moved.resumed})
        finally:
            await conn.close()
    counts = ", ".join(f"{n:,} {table}" for table, n in moved.rows.items())
    print(f"moved shard {moved.shard} from {moved.source} to {moved.target}"
          f"{' (resumed)' if moved.resumed else ''} in {moved.seconds:.2f} s: {counts}; "
          "start `txproc serve` with the same --database-url list, then run `txproc verify`")
    return 0


def verify_summary(result: Any) -> str:
    """``txproc verify``'s text: what was checked, how fast, and the problems (the first
    twenty), the first one named on the first line."""
    report = result.report
    checked = report.checked
    counts = ", ".join(f"{int(checked.get(k, 0)):,} {k.replace('_', ' ')}" for k in (
        "transfers", "accounts", "failed_transfers", "pending_resolutions", "links",
        "anchors", "audit_events", "reconciliation_records"))
    if "newest_anchor_age_s" in checked:
        audit = ""
        if "audit_events_after_newest_anchor" in checked:
            audit = f" and {int(checked['audit_events_after_newest_anchor'])} audit events"
        anchor = (f"newest anchor {checked['newest_anchor_age_s']:.1f} s old, "
                  f"{int(checked.get('links_after_newest_anchor', 0))} links{audit} after it "
                  "(not vouched for by an anchor)")
    else:
        anchor = "no anchor yet: nothing vouches for the chains' tails"
    if "archives" in checked:
        # docs/design.md §16, "Archive and restore": what verify took from the archives.
        anchor += (f"; {int(checked['archives'])} archive(s) in force: "
                   f"{int(checked.get('archived_rows', 0)):,} rows in their files, balances "
                   "from their checkpoints, chains from their cuts")
    rate = f"in {result.seconds:.2f} s ({result.rows_per_s:,.0f} rows/s)"
    if report.ok:
        return f"verify: ok: {counts} {rate}; {anchor}"
    first = report.problems[0]
    lines = [f"verify: FAILED: {first.table} {first.id}: {first.kind} (expected {first.expected},"
             f" found {first.found})",
             f"{report.problems_total} problems; checked {counts} {rate}; {anchor}"]
    lines += [f"  {p.table} {p.id}: {p.kind} (expected {p.expected}, found {p.found})"
              for p in report.problems[:20]]
    return "\n".join(lines)


async def _audit(args: argparse.Namespace) -> int:
    """Print the audit records (JSON lines) of the object named, oldest first; or, with
    ``list``, the audit events."""
    import json

    import asyncpg

    from actors.edge.audit import who_made

    kinds = [k for k in ("account", "transfer", "payment") if getattr(args, k)]
    if args.listing:
        if kinds:
            print("txproc audit list: --account, --transfer and --payment name an object's "
                  "records, not the events; give one without list", file=sys.stderr)
            return 2
        return await _audit_list(args)
    if not kinds:
        print("txproc audit: name an object (--account, --transfer or --payment ID) or "
              "list the events (txproc audit list)", file=sys.stderr)
        return 2
    if args.action is not None or args.after or args.limit is not None:
        print("txproc audit: --action, --after and --limit go with list", file=sys.stderr)
        return 2
    kind = kinds[0]
    with _operator_database(args) as url:
        conn = await asyncpg.connect(url, timeout=10)
        ledgers = [await asyncpg.connect(u, timeout=10)
                   for u in further_databases(args).values()]
        try:
            records = await who_made(conn, kind, getattr(args, kind), ledgers)
        except ValueError as exc:
            print(f"txproc audit: {exc}", file=sys.stderr)
            return 2
        finally:
            for c in (conn, *ledgers):
                await c.close()
        for record in records:
            print(json.dumps(record, sort_keys=True))
        if not records:
            print(f"txproc audit: no audit record names {kind} {getattr(args, kind)}",
                  file=sys.stderr)
            return 1
        return 0


async def _audit_list(args: argparse.Namespace) -> int:
    """``txproc audit list``: the audit events as JSON lines, oldest first, a page at a
    time (every tenant's: this is the operator's view)."""
    import asyncpg
    import msgspec

    from actors.ops.audit_events import list_audit_events
    from processor.audit import AUDIT_PAGE_LIMIT_MAX, AuditQuery, AuditQueryError, audit_query_of

    command = "txproc audit list"
    if args.limit is not None and args.limit < 1:
        print(f"{command}: --limit is at least 1", file=sys.stderr)
        return 2
    try:
        params = [("after", str(args.after))]
        if args.action is not None:
            params.append(("action", args.action))
        first = audit_query_of(params)
    except AuditQueryError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return 2
    remaining = args.limit
    with _operator_database(args) as url:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            after = first.after
            while remaining is None or remaining > 0:
                limit = min(AUDIT_PAGE_LIMIT_MAX, remaining or AUDIT_PAGE_LIMIT_MAX)
                page = await list_audit_events(
                    conn, AuditQuery(after=after, limit=limit, action=first.action),
                    tenant_slot=None)
                for view in page.data:
                    print(msgspec.json.encode(view).decode())
                if remaining is not None:
                    remaining -= len(page.data)
                if page.next_cursor is None or not page.data:
                    break
                after = page.data[-1].id
        except asyncpg.UndefinedTableError:
            print(f"{command}: the database has no audit_events table; run `txproc migrate` "
                  "first", file=sys.stderr)
            return 2
        finally:
            await conn.close()
    return 0


_EVENT_IDS_RECORDED_MAX = 100


async def _dlq(args: argparse.Namespace) -> int:
    import asyncpg

    from actors.payments import outbox

    with _operator_database(args) as url:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            if args.dlq_command == "list":
                for row in await outbox.dlq_list(conn, args.limit):
                    print(" ".join(f"{k}={row[k]}" for k in (
                        "event_id", "subscriber", "event_type", "aggregate_id", "attempts",
                        "last_error", "dead_at")))
                return 0
            event_ids = None if args.all else sorted(set(args.event_ids))
            async with conn.transaction():
                count = await outbox.dlq_replay(conn, event_ids)
                if count:
                    details: dict[str, Any] = {"replayed": count}
                    if event_ids is not None:
                        # The first ids name the replay; the count says how many it named.
                        details |= {"event_ids": event_ids[:_EVENT_IDS_RECORDED_MAX],
                                    "event_ids_named": len(event_ids)}
                    await _audit_event(conn, "dlq.replayed", "dead_letters",
                                       "all" if event_ids is None else "selected",
                                       details=details)
            print(f"replayed: {count}")
            return 0
        finally:
            await conn.close()


async def _payments_review(args: argparse.Namespace) -> int:
    """``payments review list`` / ``payments review retry``: steps set aside for an
    operator, read and handed back through the payments store."""
    from actors.payments.store import PaymentStore

    with _operator_database(args) as url:
        store = await PaymentStore.connect(url, pool_size_max=2, connect_timeout_s=10,
                                           command_timeout_s=30)
        try:
            if args.review_command == "list":
                for row in await store.steps_in_review():
                    print(json.dumps(row, default=str, sort_keys=True))
                return 0
            if not args.operator.strip() or not args.reason.strip():
                print("txproc payments review retry: --operator and --reason must say "
                      "something", file=sys.stderr)
                return 2
            from actors.ops import operator_actor

            step = await store.retry_reviewed(args.step_id, now_s=time.time(),
                                              operator=args.operator, reason=args.reason,
                                              actor=operator_actor(),
                                              request_id=_CLI_REQUEST_ID)
        finally:
            await store.close()
    if step is None:
        print(f"txproc payments review retry: step {args.step_id} is not in review",
              file=sys.stderr)
        return 1
    print(f"step {step.id} of {step.subject_id} handed back to the recovery worker "
          f"(phase {step.phase.value}); recorded as retried by {args.operator}")
    return 0


def _erase(args: argparse.Namespace) -> int:
    """``txproc erase``: exit 0 when the subject is erased (now or before), 1 when the
    tenant has no such subject, 2 for a bad argument or a missing master key."""
    from processor.identity import KeyFileError
    from processor.identity.keyfile import read_private_file
    from processor.privacy import (
        MASTER_KEY_FILE_NAME,
        MasterKey,
        PrivacyError,
    )
    from processor.types import USER_DATA_CHARS_MAX

    # A customer_ref (payments), or a personal user_data value, which may hold any text.
    ref = args.subject_ref
    if not ref or len(ref) > USER_DATA_CHARS_MAX or "\x00" in ref:
        print(f"txproc erase: --subject-ref must be 1..{USER_DATA_CHARS_MAX} characters "
              "without U+0000 (a customer_ref, or a personal user_data value)",
              file=sys.stderr)
        return 2
    if not args.tenant.strip():
        print("txproc erase: --tenant names the tenant", file=sys.stderr)
        return 2
    try:
        key_file = Path(args.master_key_file
                        or _key_directory(args) / MASTER_KEY_FILE_NAME).absolute()
        master = MasterKey(read_private_file(key_file))
    except FileNotFoundError:
        print(f"txproc erase: no master key at {key_file}: name the server's with "
              "--master-key-file (a server that never had one sealed nothing)",
              file=sys.stderr)
        return 2
    except (KeyFileError, PrivacyError, OSError) as exc:
        print(f"txproc erase: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_erase_subject(args, master))


async def _tenants(args: argparse.Namespace) -> int:
    """``txproc tenants personal-user-data``: exit 0 when the tenant is marked (now or
    before), 2 for a bad argument or a database that is not migrated."""
    import asyncpg

    from actors.edge.personal import REFRESH_S, mark_personal
    from actors.ops import operator_actor
    from processor.identity import tenant_slot

    if not args.tenant.strip():
        print("txproc tenants: --tenant names the tenant", file=sys.stderr)
        return 2
    with _live_database(args) as url:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            marked = await mark_personal(conn, tenant_slot=tenant_slot(args.tenant),
                                         tenant=args.tenant, actor=operator_actor())
        except asyncpg.UndefinedTableError as exc:
            print(f"txproc tenants: {exc}; run `txproc migrate` first", file=sys.stderr)
            return 2
        finally:
            await conn.close()
    if not marked:
        print(f"tenant {args.tenant}'s user_data was marked personal before")
        return 0
    print(f"tenant {args.tenant}'s user_data is personal from now on: every front stores "
          f"pseudonyms for it within {REFRESH_S:g} s; recorded as audit event "
          "tenant.personal_user_data")
    return 0


async def _archive_or_restore(args: argparse.Namespace) -> int:
    """``txproc archive`` / ``txproc restore``: exit 0 when done, 1 when refused (the message
    says why; nothing was deleted or inserted) or done in some databases only (the message
    says which; the same command again finishes it), 2 when a database is not migrated.
    With several ``--database-url``, every database's part (docs/design.md §16)."""
    import datetime

    import asyncpg

    from actors.ledger.archive import (
        ArchiveIncomplete,
        ArchiveRefused,
        archive_databases,
        archived_up_to,
        restore_databases,
    )
    from processor.archive import retention_before
    from processor.ledger import MAIN_DATABASE

    command = f"txproc {args.command}"
    with _live_database(args) as url:
        urls = {MAIN_DATABASE: url, **further_databases(args)}
        try:
            if args.command == "archive":
                before = args.before
                if before is None:
                    before = retention_before(datetime.datetime.now(datetime.UTC),
                                              args.retain_hot_months)
                    if await archived_up_to(urls, before):
                        print(f"nothing to archive: everything before {before} is archived")
                        return 0
                for done in await archive_databases(urls, before, Path(args.to)):
                    m = done.manifest
                    print(f"archived {m.transfers:,} transfers and {m.resolutions:,} "
                          f"resolutions{_of_database(urls, m.database)} before {m.boundary} "
                          f"into {done.directory} in {done.seconds:.2f} s ({len(m.files)} "
                          f"files, {m.accounts:,} accounts in the checkpoint)")
            else:
                for back in await restore_databases(urls, Path(args.archive_dir)):
                    print(f"restored {back.name}{_of_database(urls, back.database)}: "
                          f"{back.transfers:,} transfers and {back.resolutions:,} "
                          f"resolutions in {back.seconds:.2f} s; run `txproc verify`")
        except (ArchiveRefused, ArchiveIncomplete, ValueError, FileExistsError) as exc:
            print(f"{command}: {exc}", file=sys.stderr)
            return 1
        except (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError) as exc:
            print(f"{command}: {exc}; run `txproc migrate` first", file=sys.stderr)
            return 2
    return 0


def _of_database(urls: dict[str, str], key: str) -> str:
    """`` of db1`` where the ledger has several databases; nothing where it has one."""
    return f" of {key}" if len(urls) > 1 else ""


async def _erase_subject(args: argparse.Namespace, master: MasterKey) -> int:
    import asyncpg

    from actors.ops import operator_actor
    from actors.payments.subjects import erase_subject
    from processor.identity import tenant_slot

    ref = args.subject_ref
    with _live_database(args) as url:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            erasure = await erase_subject(conn, master, tenant_slot=tenant_slot(args.tenant),
                                          customer_ref=ref, actor=operator_actor(),
                                          request_id=_CLI_REQUEST_ID)
        except asyncpg.UndefinedTableError as exc:
            print(f"txproc erase: {exc}; run `txproc migrate` first", file=sys.stderr)
            return 2
        finally:
            await conn.close()
    who = f"data subject {erasure.digest_hex[:16]} of tenant {args.tenant}"
    if not erasure.known:
        print(f"txproc erase: tenant {args.tenant} has no data subject with that reference "
              "(no payment or payout named it as customer_ref, and no personal user_data "
              "held it); nothing erased",
              file=sys.stderr)
        return 1
    if not erasure.changed:
        print(f"{who} was erased before; nothing left to erase")
        return 0
    print(f"erased {who}: {erasure.keys_destroyed} key(s) destroyed; {erasure.payments} "
          f"payment(s) and {erasure.payouts} payout(s) keep their amounts, ids and times; "
          f"{erasure.events_scrubbed} event(s), {erasure.answers_scrubbed} stored answer(s) "
          f"and {erasure.refunds_scrubbed} refund(s) scrubbed; {erasure.user_data_values} "
          "personal user_data value(s) deleted; recorded as audit event subject.erased")
    return 0


def _webhooks_in_data_dir(args: argparse.Namespace) -> int:
    if not args.database_url and not Path(args.data_dir).is_dir():
        # A mistyped directory would get a new embedded database that no server reads.
        print(f"txproc webhooks {args.webhooks_command}: the data directory "
              f"{Path(args.data_dir).resolve()} does not exist; name the server's --data-dir "
              "or --database-url", file=sys.stderr)
        return 2
    return asyncio.run(_webhooks(args))


async def _webhooks(args: argparse.Namespace) -> int:
    """``webhooks add`` / ``list`` / ``remove``: tenants' webhook endpoints in the server's
    database, through the same code as the API (actors/payments/webhook_endpoints.py).
    The relay sends to an endpoint added here from the next event on, without a restart."""
    import secrets

    import asyncpg

    from actors.ops import operator_actor
    from actors.payments import webhook_endpoints
    from processor.identity import tenant_slot
    from processor.payments import (
        SECRET_BYTES,
        WebhookEndpointError,
        WebhookEndpointRequest,
        check_endpoint,
        endpoint_id_of,
    )

    command = f"txproc webhooks {args.webhooks_command}"
    with _operator_database(args) as url:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            if args.webhooks_command == "add":
                events = [e.strip() for e in args.events.split(",") if e.strip()]
                try:
                    request = msgspec.convert({"url": args.url, "events": events or None},
                                              WebhookEndpointRequest)
                    endpoint_url, types = check_endpoint(request)
                except (msgspec.ValidationError, WebhookEndpointError) as exc:
                    print(f"{command}: {exc}", file=sys.stderr)
                    return 2
                view, _ = await webhook_endpoints.create_endpoint(
                    conn, endpoint_id=endpoint_id_of(secrets.token_hex(12)),
                    tenant=str(tenant_slot(args.tenant)), url=endpoint_url, events=types,
                    secret=secrets.token_bytes(SECRET_BYTES), actor=operator_actor(),
                    request_id=_CLI_REQUEST_ID)
                print(msgspec.json.encode(view).decode())
                print(f"{command}: the secret is not shown again", file=sys.stderr)
                return 0
            if args.webhooks_command == "list":
                after = None
                while True:
                    views, after = await webhook_endpoints.endpoints_of(
                        conn, str(tenant_slot(args.tenant)),
                        limit=webhook_endpoints.ENDPOINTS_PAGE_MAX, after=after)
                    for view in views:
                        print(msgspec.json.encode(view).decode())
                    if after is None:
                        return 0
            removed = await webhook_endpoints.remove_endpoint(
                conn, args.endpoint_id, None, actor=operator_actor(),
                request_id=_CLI_REQUEST_ID)
        except webhook_endpoints.EndpointRefused as exc:
            print(f"{command}: {exc}", file=sys.stderr)
            return 2
        except asyncpg.UndefinedColumnError:
            print(f"{command}: the database predates webhook endpoints; run `txproc migrate` "
                  "first", file=sys.stderr)
            return 2
        finally:
            await conn.close()
    if removed is None:
        print(f"{command}: no webhook endpoint {args.endpoint_id} is in use", file=sys.stderr)
        return 1
    print(f"removed {removed.id}; nothing more is sent to it")
    return 0


API_ADDRESS_FILE = "api.json"


def _recon_run(args: argparse.Namespace) -> int:
    """``recon run``: POST /v1/reconciliation/runs to the running server, then a summary."""
    import getpass

    import httpx

    command = "txproc recon run"
    data_dir = Path(args.data_dir).resolve()
    url = args.url
    if not url:
        try:
            url = json.loads((data_dir / API_ADDRESS_FILE).read_text())["url"]
        except (OSError, ValueError, KeyError, TypeError):
            print(f"{command}: no server address in {data_dir / API_ADDRESS_FILE}; start "
                  "`txproc serve` with this --data-dir, or name it with --url", file=sys.stderr)
            return 2
    token = args.token
    if not token:
        from processor.identity import load_or_create_ring

        if not data_dir.is_dir():
            print(f"{command}: no --token and no data directory {data_dir} to sign one with",
                  file=sys.stderr)
            return 2
        user = re.sub(r"[^A-Za-z0-9_.-]", "_", getpass.getuser())[:60] or "unknown"
        ring = load_or_create_ring(data_dir, now_s=int(time.time()))
        token = issue_token(ring.active.secret, ["reconciliation:read", "reconciliation:write"],
                            ttl_s=600, now_s=int(time.time()), subject=f"cli-{user}")
    try:
        answer = httpx.post(f"{url.rstrip('/')}/v1/reconciliation/runs",
                            json={"provider": args.provider, "date": args.date},
                            headers={"authorization": f"Bearer {token}"}, timeout=300)
    except httpx.HTTPError as exc:
        print(f"{command}: the server at {url} did not answer: {type(exc).__name__}",
              file=sys.stderr)
        return 2
    try:
        body = answer.json()
    except ValueError:
        body = {}
    if answer.status_code != 200:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        print(f"{command}: {answer.status_code} {error.get('code', '')}: "
              f"{error.get('message', answer.text[:200])}", file=sys.stderr)
        return 2
    print(_run_summary(body))
    return 0 if body.get("status") == "succeeded" else 1


def _run_summary(run: dict[str, Any]) -> str:
    """A run as a few aligned tables: the run, its totals per currency, its exceptions."""
    lines = [f"run {run['id']}: {run['provider']} {run['date']} attempt {run['attempt']} "
             f"{run['status']}" + (f" ({run['error']})" if run.get("error") else ""),
             f"lines {run['lines']}, matched {run['matched_count']}, exceptions "
             f"{run['unmatched_count']}, closed {run['closed_count']}, fees posted "
             f"{run['fees_posted']}"]
    rows = [("currency", "lines", "matched", "matched_amount", "exceptions", "at_stake",
             "fees")]
    for currency, t in sorted(run.get("totals", {}).items()):
        rows.append((currency, *(str(t[k]) for k in (
            "lines", "matched_count", "matched_amount", "unmatched_count",
            "unmatched_amount", "fees"))))
    exceptions = run.get("exceptions") or []
    table = [("exception", "kind", "status", "amount", "currency", "subject", "step")]
    table += [(str(e["id"]), e["kind"], e["status"], str(e["amount"]), e["currency"],
               e["subject_id"] or "-", str(e["step_id"] or "-")) for e in exceptions]
    for block in (rows, table):
        if len(block) == 1:
            continue
        widths = [max(len(row[i]) for row in block) for i in range(len(block[0]))]
        lines.append("")
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                  for row in block]
    return "\n".join(lines)


def _write_api_address(config: Config, http_port: int) -> Path:
    """Record where the API listens, for commands that ask the server (``recon run``)."""
    scheme = "https" if config.front.tls else "http"
    host = "127.0.0.1" if config.front.host in ("0.0.0.0", "") else config.front.host  # noqa: S104 - a wildcard bind is reached on loopback
    target = Path(config.data_dir) / API_ADDRESS_FILE
    partial = target.with_name(f".{API_ADDRESS_FILE}.partial")
    partial.write_text(json.dumps({"url": f"{scheme}://{host}:{http_port}",
                                   "pid": os.getpid()}) + "\n")
    os.replace(partial, target)
    return target


async def _serve(config: Config) -> int:
    from actors.app.runtime import FRONTS_FILE, ListenError, start_processor

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        processor = await start_processor(config)
    except (KeyFileError, ListenError) as exc:
        # A key file is checked before anything starts: the message names the file and the
        # fix. A front's address is known only when it binds.
        print(f"txproc serve: {exc}", file=sys.stderr)
        return 2
    # ray.init installs its own SIGTERM handler, which exits at once; take the signals back
    # so a stop flushes and closes what was started.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
        loop.add_signal_handler(sig, stop.set)
    log.info("txproc serving: %s://%s:%d (healthz, readyz, /v1, /openapi.json), rpc%s %s:%d, "
             "metrics http://%s:%d/metrics, %d shards, data %s",
             "https" if config.front.tls else "http", config.front.host,
             processor.http_port, " over TLS" if config.front.tls else "", config.front.host,
             processor.rpc_port, config.front.host,
             processor.metrics_port, config.shard.shards, config.data_dir)
    for front in processor.fronts:
        log.info("front %d on node %s: http %s://%s:%d, rpc %s (%s)",
                 front.placement.index, front.placement.node_id[:12],
                 "https" if config.front.tls else "http", front.placement.address,
                 front.http_port, front.rpc_address, FRONTS_FILE)
    address = _write_api_address(config, processor.http_port)
    supervisor = loop.create_task(processor.supervise())
    retention = None
    if config.retention.hot_months:
        from actors.ledger.archive import retention_loop

        # As the owner role (the service's cannot delete), from this process only.
        retention = loop.create_task(retention_loop(
            processor.admin_database_urls, config.retention,
            holder=f"serve-{socket.gethostname()}-{os.getpid()}"))
    await stop.wait()
    with contextlib.suppress(OSError):
        address.unlink()
    log.info("shutting down: flushing shards and closing")
    supervisor.cancel()
    if retention is not None:
        retention.cancel()
    await processor.stop()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
