"""The mutation check (tests/mutants.py) in CI: every listed bug, applied to a copy of the
tree, makes the tests that guard against it fail."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


HERE = Path(__file__).resolve().parent


@pytest.mark.engine
@pytest.mark.slow
def test_every_mutant_is_caught(tmp_path):
    out = tmp_path / "mutants.json"
    r = subprocess.run([sys.executable, str(HERE / "mutants.py"), "--json", str(out)],
                       capture_output=True, text=True, timeout=3600)
    print(r.stdout[-4000:])
    results = json.loads(out.read_text()) if out.exists() else []
    escaped = [m["name"] for m in results if not m["caught"]]
    assert r.returncode == 0 and not escaped, (escaped, r.stdout[-3000:], r.stderr[-2000:])
    assert len(results) >= 11


def test_mutant_snippets_exist_once():
    """Cheap guard run with the fast tests: a rewrite that moves a mutant's code fails
    here first (update the snippet in tests/mutants.py with the rewrite)."""
    sys.path.insert(0, str(HERE))
    try:
        import mutants
    finally:
        sys.path.remove(str(HERE))
    for m in mutants.MUTANTS:
        text = (mutants.ROOT / m.path).read_text()
        for old, new in m.edits:
            assert text.count(old) == 1, (m.name, old)
            assert old != new
    assert len({m.name for m in mutants.MUTANTS}) == len(mutants.MUTANTS)
