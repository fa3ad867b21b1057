"""The worker key: the ZeroMQ CURVE key pair that authenticates engine workers to their front end.

    python -m cloud.engine.keys worker.key      # a new key file, readable by its owner only

Front end and workers hold the same key pair. The front end's ROUTER is a CURVE server with it
and admits only a peer that authenticates as its public key, which takes the secret half: a
process without the file can neither join as a worker nor read the channel. `flow serve
--worker-key FILE` and `python -m cloud.engine.worker --worker-key FILE` read the file (a ZeroMQ
secret certificate). Without one, `flow serve` makes a fresh key for its local workers and hands
it to them in a file of its private temporary directory, removed once they have joined; a `--bind
tcp://` front end, which workers on other hosts join, needs the operator's file.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from flow.errors import ConfigError

_HEADER = ("#   familial-flow worker key (ZeroMQ CURVE secret certificate)\n"
           "#   Whoever holds this file can serve as an engine worker: keep it private.\n\n")


@dataclass(frozen=True)
class WorkerKey:
    """A CURVE key pair, both halves Z85-encoded (40 bytes each)."""

    public: bytes
    secret: bytes

    def __repr__(self) -> str:  # never print the secret half in a log or a traceback
        return f"WorkerKey(public={self.public.decode()!r})"

    @classmethod
    def generate(cls) -> WorkerKey:
        _require_curve()
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    @classmethod
    def load(cls, path: Path) -> WorkerKey:
        """The key in `path`; refused when others may read it or it holds no secret half."""
        path = Path(path)
        _require_curve()
        try:
            mode = path.stat().st_mode
            public, secret = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot read the worker key {path}: {err}; make one with "
                              f"`python -m cloud.engine.keys {path}`") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"the worker key {path} is readable by others (mode "
                              f"{stat.S_IMODE(mode):o}): `chmod 600 {path}`")
        if not secret:
            raise ConfigError(f"{path} holds no secret key: give the file `python -m "
                              f"cloud.engine.keys` wrote, not a public certificate")
        return cls(public, secret)

    def save(self, path: Path) -> None:
        """Write the key to a new file `path` that only its owner may read (mode 0600)."""
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(f'{_HEADER}metadata\ncurve\n    public-key = "{self.public.decode()}"\n'
                       f'    secret-key = "{self.secret.decode()}"\n')

    def serve(self, socket: zmq.Socket) -> None:
        """Make `socket` (the front end's ROUTER, before it binds) a CURVE server with this key."""
        socket.curve_secretkey, socket.curve_publickey = self.secret, self.public
        socket.curve_server = True

    def join(self, socket: zmq.Socket) -> None:
        """Make `socket` (a worker's DEALER, before it connects) a CURVE client with this key."""
        socket.curve_secretkey, socket.curve_publickey = self.secret, self.public
        socket.curve_serverkey = self.public

    def admits(self, domain: str, client_key: bytes) -> bool:
        """ZAP: whether a CURVE client that authenticated as `client_key` (Z85) may connect."""
        return client_key == self.public

    callback = admits  # the name `zmq.auth` calls a credentials provider by


def _require_curve() -> None:
    if not zmq.has("curve"):
        raise ConfigError("this libzmq has no CURVE support, which engine workers need to "
                          "authenticate; install pyzmq's wheel (it bundles libzmq with CURVE)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cloud.engine.keys",
        description="Write a new worker key: give the same file to `flow serve --worker-key` and "
                    "to every `python -m cloud.engine.worker --worker-key`.")
    parser.add_argument("path", type=Path, help="the key file to create (must not exist)")
    args = parser.parse_args(argv)
    try:
        WorkerKey.generate().save(args.path)
    except FileExistsError:
        print(f"{args.path} exists; choose another path or remove it first", file=sys.stderr)
        return 1
    print(f"wrote {args.path} (mode 600); copy it to each worker host over a private channel")
    return 0


if __name__ == "__main__":
    sys.exit(main())
