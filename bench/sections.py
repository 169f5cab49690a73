"""
The benches' sections of bench/RESULTS.md: each bench replaces its own
(from its `## ` heading to the next one) and keeps the rest.
"""

from __future__ import annotations


def write_section(path: str, text: str, section: str) -> None:
    """
    Replace (or append) the section headed C{section} in C{path} with
    C{text} (which starts with that heading), keeping the rest.
    """
    try:
        with open(path, encoding="utf-8") as f:
            old = f.read()
    except FileNotFoundError:
        old = ""
    if old.startswith(section + "\n"):
        old = "\n" + old
    start = old.find("\n" + section + "\n")
    if start == -1:
        new = old.rstrip("\n") + ("\n\n" if old else "") + text
    else:
        end = old.find("\n## ", start + 1)
        rest = old[end:] if end != -1 else ""
        new = old[:start + 1] + text + rest
    with open(path, "w", encoding="utf-8") as f:
        f.write(new.lstrip("\n") if not old.strip() else new)
