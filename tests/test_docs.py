"""The repository stands alone: its docs, configs and code cite no file a clone does not have."""
from __future__ import annotations

import re

from harness import ROOT

# Built from pieces so that this file does not match its own search.
OUTSIDE = re.compile("|".join(("STYLE" + r"\.md", "DESIGN" + r"\.md", "reference" + " §", r"\.\./" + "shared",
                               "/work/" + "shared")))
NOT_YET: set[str] = set()


def test_no_file_cites_documents_outside_the_repository():
    cited = []
    for pattern in ("*.md", "docs/*.md", "demo/**/*.toml", "demo/**/*.md", "demo/**/*.sh",
                    "infinilm_svc/**/*.py", "console/**/*.py", "tests/*.py"):
        for path in ROOT.glob(pattern):
            rel = path.relative_to(ROOT).as_posix()
            if rel in NOT_YET or rel == "tests/test_docs.py":
                continue
            for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if OUTSIDE.search(line):
                    cited.append(f"{rel}:{no}: {line.strip()}")
    assert cited == []
