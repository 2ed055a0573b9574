"""Atomic files under concurrent writers (#23): two processes rewriting one file never fail and
never leave it half-written or a temporary file behind (one fixed temporary name made 55 and 73 of
3,000 writes fail with FileNotFoundError)."""

import json
import subprocess
import sys

from conftest import ROOT

WRITER = """
import json, sys
from pathlib import Path
from llmcli.files import write_json_atomic
path = Path(sys.argv[1])
for i in range(1500):
    write_json_atomic(path, {"writer": sys.argv[2], "i": i, "pad": "x" * 2000})
"""


def test_two_processes_writing_one_file(tmp_path):
    target = tmp_path / "leaderboard.json"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(target), name], cwd=ROOT, stderr=subprocess.PIPE, text=True)
             for name in ("a", "b")]
    reads = 0
    while any(p.poll() is None for p in procs):
        if target.exists():
            json.loads(target.read_text())  # never half a file
            reads += 1
    errors = [p.stderr.read() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert json.loads(target.read_text())["i"] == 1499
    assert sorted(f.name for f in tmp_path.iterdir()) == ["leaderboard.json"]  # no temporary file left
    assert reads > 0


def test_the_new_file_gets_the_usual_permissions(tmp_path):
    import os

    from llmcli.files import atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "x")
    (tmp_path / "b.txt").write_text("x")
    assert os.stat(tmp_path / "a.txt").st_mode == os.stat(tmp_path / "b.txt").st_mode
