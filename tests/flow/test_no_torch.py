"""The core that a device needs imports and works where torch cannot be imported at all."""

from runs import run_without_torch


def test_flow_core_and_info_work_without_torch(tmp_path, tiny_family):
    tiny_family.save(tmp_path / "fam")
    result = run_without_torch(f"""
        import flow
        from flow import FamilyConfig, preset
        from flow.artifact import read_manifest
        manifest = read_manifest({str(tmp_path / 'fam')!r})
        assert manifest.family_hash == {tiny_family.family_hash()!r}
        assert preset("demo").member_parameters(0) > 0
        from flow.cli.main import main
        assert main(["info", {str(tmp_path / 'fam')!r}]) == 0
        assert "torch" not in sys.modules
        try:
            flow.Family
        except ImportError as err:
            print("Family needs torch:", err)
    """)
    assert result.returncode == 0, result.stderr
    assert "Family needs torch: No module named 'torch'" in result.stdout


def test_commands_that_need_torch_say_which_extra_in_one_line(tmp_path, tiny_family):
    """Catches: `flow serve` or `flow export-onnx` on a device install (no torch) ending in an
    ImportError traceback instead of naming the extra to install."""
    tiny_family.save(tmp_path / "fam")
    for command in (["serve", str(tmp_path / "fam"), "--port", "0"],
                    ["export-onnx", str(tmp_path / "fam")]):
        result = run_without_torch(f"""
            from flow.cli.main import main
            sys.exit(main({command!r}))
        """)
        assert result.returncode == 1, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        line = result.stderr.strip().splitlines()[-1]
        assert f"flow {command[0]}: error: this command needs torch" in line
        assert "pip install 'familial-flow[cloud]'" in line
