"""The CLI end to end with click's CliRunner: outputs, one-line errors, exit codes."""
from __future__ import annotations

from click.testing import CliRunner

from stages.cli import main


def test_synthetic_then_inspect(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["synthetic", "--out", str(tmp_path / "d"), "-n", "6", "--image-size", "32"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["inspect-data", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert "6 images (kaggle layout)" in result.output
    assert "state: " in result.output


def test_user_error_is_one_line_without_traceback(tmp_path):
    result = CliRunner().invoke(main, ["inspect-data", str(tmp_path / "nowhere")])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == f"Error: {tmp_path / 'nowhere'}: data path does not exist"
