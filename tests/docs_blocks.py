"""The code blocks and shell commands of the user docs, with their docs-test marks, for tests.

A block is run by tests/e2e/test_docs_examples.py against a real service when it talks to one
(it names localhost:8002). An HTML comment on the lines right before a fenced block steers it:

    <!-- docs-test: skip (why it cannot run here: needs a GPU, Docker, ...) -->
    <!-- docs-test: needs CAPABILITY -->          (images, tools, admin, ...: skipped, with the
                                                    reason, unless the docs test service has it)
    <!-- docs-test: output-contains TEXT -->      (its output must contain TEXT; repeatable)
    <!-- docs-test: response-of /generate -->     (a json block: the fields of that endpoint's
                                                    answer to a chat request, checked by name)

Every bash or python block either talks to the service or carries a skip mark
(tests/deploy/test_docs_blocks.py): nothing is left out silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "QUICKSTART.md")
RUNNABLE = {"bash": "bash", "sh": "bash", "shell": "bash", "console": "bash", "python": "python", "py": "python"}
MARK_KEYS = ("skip", "needs", "output-contains", "response-of")
SERVICE_ADDRESS = re.compile(r"(?:https?://)?(?:localhost|127\.0\.0\.1):8002")
_MARK = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<key>[a-z-]+)\s*(?P<arg>.*?)\s*-->\s*$")
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```|~~~)\s*(?P<lang>[\w+-]*)")
_INLINE_COMMAND = re.compile(r"`(curl [^`]*)`")


@dataclass
class Block:
    """One fenced code block (or inline command) of a doc, with the marks right before it."""

    doc: str
    line: int
    lang: str  # bash, python, or the fence's own language for anything else
    code: str
    marks: list[tuple[str, str]] = field(default_factory=list)
    inline: bool = False

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def runnable(self) -> bool:
        return self.lang in ("bash", "python")

    @property
    def talks_to_service(self) -> bool:
        return bool(SERVICE_ADDRESS.search(self.code))

    def mark(self, key: str) -> list[str]:
        return [arg for k, arg in self.marks if k == key]

    @property
    def skip_reason(self) -> str | None:
        reasons = self.mark("skip")
        return reasons[0].strip("() ") if reasons else None


def blocks(doc: str) -> list[Block]:
    """Every fenced block of `doc` (a path relative to the repository) and every inline
    `curl ...` command that talks to the service."""
    lines = (REPO / doc).read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    marks: list[tuple[str, str]] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        mark = _MARK.match(line)
        fence = _FENCE.match(line)
        if mark:
            marks.append((mark["key"], mark["arg"]))
        elif fence:
            end = index + 1
            while end < len(lines) and not lines[end].strip().startswith(fence["fence"]):
                end += 1
            lang = fence["lang"].lower()
            code = "\n".join(lines[index + 1 : end]) + "\n"
            found.append(Block(doc, index + 1, RUNNABLE.get(lang, lang), code, marks))
            marks = []
            index = end
        else:
            if line.strip():
                marks = []
            for command in _INLINE_COMMAND.findall(line):
                if SERVICE_ADDRESS.search(command):
                    found.append(Block(doc, index + 1, "bash", command + "\n", inline=True))
        index += 1
    return found


def all_blocks() -> list[Block]:
    return [block for doc in DOCS for block in blocks(doc)]
