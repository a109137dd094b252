"""README is the front door: its Python example runs as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(capsys):
    """The "Ten lines of Python" example (the official-checkpoint snippet needs files this machine lacks)."""
    section = README.read_text().split("## Ten lines of Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the ten-line section should hold one python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "text (1,)" in printed and "audio (" in printed
