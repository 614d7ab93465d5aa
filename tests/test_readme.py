"""The README's worked example of a custom pass runs as written."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_readme_custom_pass_example_runs(monkeypatch, capsys):
    text = (REPO / "README.md").read_text()
    section = text.split("## Write your own pass", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(REPO)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    status, stats = capsys.readouterr().out.strip().split(" ", 1)
    assert status == "changed" and stats == "{'swapped': 1}"
