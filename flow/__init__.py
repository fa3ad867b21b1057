"""familial-flow: train one familial model once, deploy each of its exits as a model.

`FamilyConfig` and the artifact reader need no torch; `Family` (the torch reference model and
its artifact) is imported on first use, so a device that installs only the `[device]` extra can
import `flow` without torch.
"""

from flow.config import FamilyConfig, preset
from flow.errors import ArtifactError, ConfigError, DataError, FlowError, HashMismatchError

__all__ = ["Family", "FamilyConfig", "preset", "FlowError", "ConfigError", "ArtifactError",
           "HashMismatchError", "DataError"]


def __getattr__(name: str):
    if name == "Family":
        from flow.family import Family

        return Family
    raise AttributeError(f"module 'flow' has no attribute {name!r}")
