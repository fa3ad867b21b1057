"""`flow generate` with a next tier that is not there: said, not silently offline."""

from runs import flow, free_port


def test_a_dead_cloud_address_is_said_and_require_cloud_makes_it_an_error(device_family):
    """Catches: `--cloud HOST:PORT` with nothing listening silently producing the member's own
    tokens as if the tier had been asked, a malformed address accepted, and `--require-cloud`
    not failing."""
    family_dir = device_family[0]
    dead = f"127.0.0.1:{free_port()}"
    common = ["generate", family_dir, "--prompt", "def f(x):", "--mode", "exit",
              "--max-new-tokens", "4", "--ignore-eos", "--color", "never"]
    result = flow(*common, "--cloud", dead, timeout=120)
    assert f"nothing answers at --cloud {dead}" in result.stderr
    assert "4 offline" in result.stderr.strip().splitlines()[-1]  # the summary line
    strict = flow(*common, "--cloud", dead, "--require-cloud", check=False, timeout=120)
    assert strict.returncode == 1 and "Traceback" not in strict.stderr
    assert "--require-cloud was given" in strict.stderr.strip().splitlines()[-1]
    malformed = flow(*common, "--cloud", "nonsense", check=False, timeout=120)
    assert malformed.returncode == 1 and "is not HOST:PORT" in malformed.stderr
