"""`flow serve`: run a tier's gRPC service for a family (registered through `flow.commands`)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
from pathlib import Path

from cloud.engine.config import EngineLimits
from cloud.server_config import ServerConfig
from flow.confidence import DEFAULT_POLICY, DEFAULT_THRESHOLDS, POLICIES


def register(subcommands: argparse._SubParsersAction) -> None:
    serve = subcommands.add_parser(
        "serve", help="serve the blocks after an exit over gRPC (the cloud or edge tier)",
        description="Serve flow.v1.Tier for FAMILY: sessions continue after member --from-exit "
                    "through the deeper blocks on a batched engine and answer with the full "
                    "model's tokens; Generate runs the whole model from token ids. Health "
                    "checking and server reflection are on. Stops cleanly on SIGINT/SIGTERM.")
    serve.add_argument("family", type=Path, help="family directory (weights.safetensors needed)")
    serve.add_argument("--from-exit", type=int, default=0,
                       help="the exit devices stop at (default 0); sessions may continue after any "
                            "exit, this one is checked at start")
    add_flags(serve, ServerConfig)
    add_flags(serve, EngineLimits)
    serve.add_argument("--to-exit", type=int, default=None,
                       help="make this an edge tier: answer at exit J when its confidence passes "
                            "--threshold, else forward to --next (default: run to the full model)")
    serve.add_argument("--next", default=None, help="HOST:PORT of the tier an edge forwards to")
    serve.add_argument("--next-token-file", type=Path, default=None,
                       help="bearer token for --next (first line of the file)")
    serve.add_argument("--policy", choices=POLICIES, default=DEFAULT_POLICY,
                       help=f"an edge's confidence policy (default {DEFAULT_POLICY})")
    serve.add_argument("--threshold", type=float, default=None,
                       help="an edge's confidence threshold (default the policy's: "
                            + ", ".join(f"{p} {t}" for p, t in DEFAULT_THRESHOLDS.items()) + ")")
    serve.add_argument("--workers", type=int, default=0,
                       help="engine worker processes (ZeroMQ); 0 (default) runs the engine in this "
                            "process")
    serve.add_argument("--bind", default=None,
                       help="ROUTER endpoint workers connect to (default an ipc:// path in a "
                            "private directory; tcp://0.0.0.0:5555 lets `python -m "
                            "cloud.engine.worker --worker-key FILE` join from other hosts, and "
                            "needs --worker-key)")
    serve.add_argument("--worker-key", type=Path, default=None,
                       help="the workers' key file (ZeroMQ CURVE), needed with --bind tcp://; "
                            "make one with `python -m cloud.engine.keys FILE` and give the same "
                            "file to each `python -m cloud.engine.worker --worker-key` (default: "
                            "a fresh key that only the local --workers get)")
    serve.add_argument("--metrics-port", type=int, default=None,
                       help="serve Prometheus metrics on http://HOST:PORT/metrics (default off)")
    serve.add_argument("--log-format", choices=("text", "json"), default="text",
                       help="log lines as text or as one JSON object each (default text)")
    serve.add_argument("--token-file", type=Path, default=None,
                       help="file of accepted bearer tokens, one per line (default: no auth)")
    serve.add_argument("--tls-cert", type=Path, default=None, help="server certificate (PEM)")
    serve.add_argument("--tls-key", type=Path, default=None, help="server private key (PEM)")
    serve.add_argument("--client-ca", type=Path, default=None,
                       help="CA (PEM) that client certificates must chain to (mutual TLS)")
    serve.set_defaults(handler=run_serve)


def add_flags(parser: argparse.ArgumentParser, config_class) -> None:
    """A flag for each field of the dataclass `config_class` whose metadata names one: typed
    and defaulted as the field, with its help and default."""
    for spec in dataclasses.fields(config_class):
        if "flag" in spec.metadata:
            flag = spec.metadata["flag"]
            default = f"{spec.default:g}" if isinstance(spec.default, float) else spec.default
            parser.add_argument(flag, dest=spec.name, type=type(spec.default), default=spec.default,
                                metavar=flag.lstrip("-").replace("-", "_").upper(),
                                help=f"{spec.metadata['help']} (default {default})")


def from_flags(config_class, args: argparse.Namespace, **others):
    """`config_class` from the flags `add_flags` made, and `others` for the rest of its fields."""
    flagged = {spec.name: getattr(args, spec.name) for spec in dataclasses.fields(config_class)
               if "flag" in spec.metadata}
    return config_class(**flagged, **others)


def check_tls_files(cert: Path, key: Path, client_ca: Path | None) -> None:
    """`ConfigError` unless `cert` and `key` are a PEM certificate and its private key and
    `client_ca` (if given) a PEM CA: TLS that was asked for is never replaced by plaintext."""
    import ssl

    from flow.errors import ConfigError

    for flag, path in (("--tls-cert", cert), ("--tls-key", key), ("--client-ca", client_ca)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{flag} {path}: no such file")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except ssl.SSLError as err:
        raise ConfigError(f"--tls-cert {cert} and --tls-key {key} are not a PEM certificate and "
                          f"its private key ({err.reason or err})") from None
    if client_ca is not None:
        try:
            ssl.create_default_context(cafile=str(client_ca))
        except ssl.SSLError as err:
            raise ConfigError(f"--client-ca {client_ca} is not a PEM certificate authority "
                              f"({err.reason or err})") from None


def read_tokens(path: Path, flag: str) -> tuple[str, ...]:
    """The bearer tokens in `path`, one per line; `ConfigError` if it is unreadable or empty."""
    from flow.errors import ConfigError

    try:
        tokens = tuple(t.strip() for t in path.read_text().splitlines() if t.strip())
    except OSError as err:
        raise ConfigError(f"{flag} {path}: {err.strerror or err}") from None
    if not tokens:
        raise ConfigError(f"{flag} {path} holds no token")
    return tokens


def run_serve(args: argparse.Namespace) -> None:
    from cloud.service import TierSpec, serve
    from flow.errors import ConfigError

    _configure_logging(args.log_format)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    if args.tls_cert is not None:
        check_tls_files(args.tls_cert, args.tls_key, args.client_ca)
    tokens = read_tokens(args.token_file, "--token-file") if args.token_file is not None else ()
    config = from_flags(
        ServerConfig, args, tokens=tokens,
        tls_cert=args.tls_cert.read_bytes() if args.tls_cert else None,
        tls_key=args.tls_key.read_bytes() if args.tls_key else None,
        client_ca=args.client_ca.read_bytes() if args.client_ca else None)
    limits = from_flags(EngineLimits, args)
    if len(tokens) > 1 and not limits.max_sessions_per_identity:
        logging.getLogger("flow.cloud").warning(
            "%d identities share %d KV slots with no per-identity cap: one of them can hold every "
            "slot; set --max-sessions-per-identity", len(tokens), limits.max_sessions)
    next_token = (read_tokens(args.next_token_file, "--next-token-file")[0]
                  if args.next_token_file else None)
    spec = TierSpec(args.family, args.from_exit, limits, config, workers=args.workers,
                    endpoint=args.bind, worker_key=args.worker_key, metrics_port=args.metrics_port,
                    to_exit=args.to_exit, next_address=args.next, policy=args.policy,
                    threshold=args.threshold, next_token=next_token)
    # The first stdout line names the address: scripts started with --port 0 read it.
    asyncio.run(serve(spec, ready=lambda server: print(f"listening on {server.address}", flush=True)))


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: what log shippers parse without a grok pattern."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage(), "pid": record.process}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _configure_logging(style: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(_JsonFormatter() if style == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])

