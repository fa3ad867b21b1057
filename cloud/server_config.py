"""How a tier serves: `ServerConfig`, apart from the gRPC server that uses it, so that `flow
serve`'s flags come without gRPC's server packages (every `flow` command registers them, on a
device too)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ServerConfig:
    """How a tier serves: its name, who may call it, and over what transport. The fields with a
    `flag` in their metadata are `flow serve` flags of that name."""

    name: str = field(default="cloud", metadata={
        "flag": "--name", "help": "tier name reported to clients"})
    host: str = field(default="127.0.0.1", metadata={
        "flag": "--host", "help": "address to listen on"})
    port: int = field(default=50051, metadata={
        "flag": "--port", "help": "port; 0 = any free"})
    tokens: tuple[str, ...] = field(default=(), metadata={
        "help": "bearer tokens accepted; empty = no authentication"})
    tls_key: bytes | None = field(default=None, metadata={
        "help": "server private key (PEM); with tls_cert, serve TLS"})
    tls_cert: bytes | None = field(default=None, metadata={"help": "server certificate (PEM)"})
    client_ca: bytes | None = field(default=None, metadata={
        "help": "CA (PEM) that client certificates must chain to (mutual TLS)"})
    # None: the largest request the engine limits allow (`cloud.service.largest_request_bytes`),
    # so that a flood of oversized messages is refused before it is read into memory.
    max_receive_bytes: int | None = field(default=None, metadata={
        "help": "largest gRPC message taken"})
    max_send_bytes: int = field(default=64 << 20, metadata={
        "help": "largest gRPC message sent"})
    grace_s: float = field(default=5.0, metadata={
        "help": "on shutdown, seconds in-flight calls get to finish"})
