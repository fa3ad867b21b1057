"""`flow serve` refuses settings it cannot honour in one line, before serving anything."""

import socket

import pytest

from runs import flow


@pytest.fixture
def empty(tmp_path):
    path = tmp_path / "empty.pem"
    path.write_text("")
    return path


@pytest.mark.parametrize("flags, message", [
    (["--tls-cert", "{empty}", "--tls-key", "{empty}"], "are not a PEM certificate and its private key"),
    (["--tls-cert", "{missing}", "--tls-key", "{empty}"], "no such file"),
    (["--tls-cert", "{empty}"], "--tls-cert and --tls-key go together"),
    (["--port", "99999"], "port must be in 0..65535"),
    (["--token-file", "{empty}"], "holds no token"),
    (["--token-file", "{missing}"], "--token-file {missing}: No such file or directory"),
    (["--from-exit", "0", "--to-exit", "1", "--next", "127.0.0.1:1", "--next-token-file", "{empty}"],
     "--next-token-file {empty} holds no token"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--from-exit", "1", "--to-exit", "0", "--next", "127.0.0.1:1"], "--to-exit 0 must come after --from-exit 1"),
    (["--host", "192.0.2.1"], "cannot listen on 192.0.2.1:"),
    (["--workers", "1", "--bind", "nonsense"], "--bind 'nonsense' is not a ZeroMQ endpoint"),
    (["--metrics-port", "{busy}"], "cannot serve metrics on 127.0.0.1:"),
])
def test_flow_serve_refuses_what_it_cannot_honour_in_one_line(device_family, tmp_path, empty,
                                                               flags, message):
    """Catches: TLS asked for with unusable files served as plaintext, a port out of range bound
    to a random one, settings silently ignored (negative workers, an edge answering before the
    devices' exit), an address or port it cannot listen on, and any of these ending in a
    traceback."""
    with socket.socket() as busy:  # a port something else listens on
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        flags = [f.format(empty=empty, missing=tmp_path / "missing.pem", busy=busy.getsockname()[1])
                 for f in flags]
        result = flow("serve", device_family[0], *flags, check=False, timeout=120)
    assert result.returncode == 1, (result.stdout, result.stderr[-2000:])
    assert "listening on" not in result.stdout
    assert "Traceback" not in result.stderr
    message = message.format(empty=empty, missing=tmp_path / "missing.pem")
    assert message in result.stderr.strip().splitlines()[-1], result.stderr[-2000:]
