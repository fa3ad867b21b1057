"""The errors flow raises on purpose.

Every user-facing failure is a `FlowError` whose message says what was wrong and what to do; the
command line prints it as one line. Anything else reaching the top is a bug.
"""


class FlowError(Exception):
    """Base class of the errors a user can act on."""


class ConfigError(FlowError, ValueError):
    """A configuration that cannot describe a working family (bad shapes, bad exits)."""


class ArtifactError(FlowError):
    """A directory that is not a valid family artifact: missing files, tampered weights, bad JSON."""


class HashMismatchError(ArtifactError):
    """Two parts that must come from the same family carry different family hashes."""


class DataError(FlowError):
    """Missing or malformed corpus, tokenizer or token files."""
