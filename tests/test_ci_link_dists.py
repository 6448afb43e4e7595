""".ci/link_dists.py: the vLLM env shares torch and triton with the main env by hardlinks, or falls back cleanly."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "link_dists.py"


def link(dest: Path, *names: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(dest), *names], capture_output=True, text=True)


def test_links_every_file_of_an_installed_dist_and_it_imports_from_there(tmp_path):
    proc = link(tmp_path, "iniconfig")
    assert proc.returncode == 0, proc.stderr
    linked = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "METADATA" for p in linked) and any(p.suffix == ".py" for p in linked)
    assert all(os.stat(p).st_nlink >= 2 for p in linked)  # links, not copies
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import iniconfig; print(iniconfig.__file__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.startswith(str(tmp_path)), out.stderr


def test_a_missing_dist_fails_and_removes_the_links_already_made(tmp_path):
    proc = link(tmp_path, "iniconfig", "no-such-distribution-here")
    assert proc.returncode == 1
    assert "installing from the index instead" in proc.stderr
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
