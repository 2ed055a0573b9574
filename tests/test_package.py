"""The package's shape (#21): wings layered by import-linter's contracts, each wing saying what it
is and what it may import, modules short enough to read."""

import subprocess
import sys
from pathlib import Path

from conftest import ROOT

WINGS = ("data", "models", "generate", "evaluate", "export", "feedback", "train", "sweep", "report", "serve")


def test_the_layers_hold():
    """pyproject.toml's contracts (also run by .ci/run): a wing imports only the core and the wings
    below it, and the core imports no wing; imports inside functions count."""
    script = Path(sys.executable).with_name("lint-imports")  # import-linter's console script, a test extra
    result = subprocess.run([str(script) if script.exists() else "lint-imports", "--config", str(ROOT / "pyproject.toml")],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_every_wing_says_what_it_is_and_what_it_may_import():
    import importlib

    for wing in WINGS:
        doc = importlib.import_module(f"llmcli.{wing}").__doc__ or ""
        assert doc.startswith(f"The {wing} wing") and "May import" in doc, wing


def test_no_module_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "llmcli").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}
