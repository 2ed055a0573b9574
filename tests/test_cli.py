"""The CLI shell: help, version, fast import, exit codes."""

import subprocess
import sys

from llmcli import __version__


def test_help_lists_the_four_commands(cli):
    result = cli("--help")
    for name in ("pretrain", "finetune", "generate", "eval"):
        assert name in result.stdout
    assert __version__ in cli("--version").stdout


def test_import_is_light():
    """`llmcli --help` must not import torch or transformers."""
    code = "import sys, llmcli.cli; print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_python_dash_m_entry_point():
    """`python -m llmcli` is what `accelerate launch -m llmcli` runs."""
    result = subprocess.run([sys.executable, "-m", "llmcli", "pretrain", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--config" in result.stdout and "--set" in result.stdout
