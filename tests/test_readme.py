"""The README stays true: its results table is generated from bench/results."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_results_table_matches_bench_results():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- ci:test -->")[1].split("<!-- /ci:test -->")[0]
    assert "python -m pytest" in block
    assert "ci:test" in (ROOT / ".ci" / "run").read_text()
