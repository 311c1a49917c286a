"""docs/troubleshooting.md lists every message sae_cache raises or warns with, kept in sync with the code.

The raise sites are read with ast: every `raise SomeError(<message>)` and `warnings.warn(<message>)` in sae_cache/
whose message is a string or f-string. A message's template is its literal text with "…" for each formatted
value; its longest literal stretch (cut at ": ", ". " and "; ") must appear in a table row of the doc. Messages
built elsewhere and passed as a variable are listed in INDIRECT with a stretch of their text.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sae_cache"
DOC = ROOT / "docs" / "troubleshooting.md"

# Messages raised through a variable: (module, a stretch of the text that builds them).
INDIRECT = [
    ("store.py", "exceed the float16 range"),  # Float16OverflowError, or the warning
    ("data.py", "the dataset looks too small: about"),  # returned by check_dataset_size, warned by the runner
]
# Raise sites that never reach a user, with the reason.
NOT_FOR_USERS = {
    ("__init__.py", "module 'sae_cache' has no attribute …"): "Python's own AttributeError for a missing name",
    ("publish.py", "renameat2 is not available on this system"): "caught: the swap falls back to backup-and-rename",
}


def template(node: ast.expr) -> str | None:
    """The message with "…" for each formatted value, or None when it is not a literal string."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "…" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = template(node.left), template(node.right)
        return None if left is None or right is None else left + right
    return None


def messages() -> list[tuple[str, int, str]]:
    """(module, line, template) of every raise or warning with a literal message in the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                call = node.exc
            elif isinstance(node, ast.Call) and ast.unparse(node.func) == "warnings.warn":
                call = node
            else:
                continue
            texts = [t for t in (template(a) for a in call.args[:2]) if t]
            if texts:
                found.append((path.name, node.lineno, texts[0]))
    return found


def key(text: str) -> str:
    """The longest stretch of a template's literal text, cut at its clauses (what a reader would search for)."""
    stretches = [part for literal in text.split("…") for part in re.split(r"[:.;] ", literal)]
    return max((part.strip(" .:;") for part in stretches), key=len)


def doc_rows() -> str:
    return "\n".join(line for line in DOC.read_text().splitlines() if line.startswith("|"))


def test_the_scan_finds_the_raise_sites():
    found = messages()
    assert len(found) > 100
    assert any("disk full while" in t for _, _, t in found) and any("must be a finite number" in t for _, _, t in found)


def test_every_message_has_a_row_in_the_doc():
    rows = doc_rows()
    missing = [
        f"{module}:{line}: {text}"
        for module, line, text in messages()
        if (module, text) not in NOT_FOR_USERS and key(text) not in rows
    ]
    assert not missing, "docs/troubleshooting.md has no row for:\n" + "\n".join(missing)


def test_indirect_messages_are_in_the_code_and_the_doc():
    rows = doc_rows()
    for module, text in INDIRECT:
        assert text in (PACKAGE / module).read_text(), (module, text)
        assert text in rows, text


def test_exemptions_still_exist():
    found = {(module, text) for module, _, text in messages()}
    assert set(NOT_FOR_USERS) <= found, set(NOT_FOR_USERS) - found
