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
    assert result.exit_code == 2  # click's usage error: the path is checked while the arguments are parsed
    assert "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == (f"Error: Invalid value for 'DATA': Path "
                                                      f"'{tmp_path / 'nowhere'}' does not exist.")
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["inspect-data", str(tmp_path / "empty")])
    assert result.exit_code == 1 and result.output.strip() == f"Error: {tmp_path / 'empty'}: the data folder is empty"


def test_argument_and_config_errors_answer_before_the_heavy_libraries_load(tmp_path):
    """A wrong path or config key is answered while the arguments are read: neither torch, pandas nor scikit-learn
    is imported first (they took 3-4 s of a one-line error; `benchmarks/train.py --fast-answers` times it)."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from stages.cli import main\n"
        "for args in (['inspect-data', sys.argv[1]], ['train-heads', '--cache', sys.argv[1], '--out', sys.argv[2]],\n"
        "             ['extract-features', '--data', sys.argv[1], '--cache', sys.argv[2]],\n"
        "             ['config', '--config', sys.argv[1]]):\n"
        "    try:\n"
        "        main(args, standalone_mode=False)\n"
        "    except Exception as exc:\n"
        "        print(type(exc).__name__)\n"
        "print(sorted(m for m in ('torch', 'pandas', 'sklearn', 'matplotlib') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "nowhere"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[:3] == ["BadParameter"] * 3 and lines[3] in ("ConfigError", "ClickException"), proc.stdout
    assert lines[-1] == "[]", proc.stdout
