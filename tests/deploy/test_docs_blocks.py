"""Every command block of README.md and QUICKSTART.md is run by the docs test or marked why not."""

from __future__ import annotations

import pytest

from tests.docs_blocks import DOCS, MARK_KEYS, REPO, Block, all_blocks, blocks

BLOCKS = all_blocks()


def test_the_docs_have_blocks_the_docs_test_runs() -> None:
    for doc in DOCS:
        assert any(b.runnable and b.talks_to_service and not b.skip_reason for b in blocks(doc)), doc


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.runnable], ids=lambda b: b.id)
def test_each_command_block_runs_or_says_why_not(block: Block) -> None:
    assert block.talks_to_service or block.skip_reason, (
        f"{block.id}: a {block.lang} block that does not talk to the service (localhost:8002) must say why "
        "the docs test cannot run it: <!-- docs-test: skip (reason) --> on the line before it"
    )


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.marks], ids=lambda b: b.id)
def test_marks_are_well_formed(block: Block) -> None:
    for key, arg in block.marks:
        assert key in MARK_KEYS, f"{block.id}: unknown docs-test mark {key!r} (known: {', '.join(MARK_KEYS)})"
        assert arg.strip("() "), f"{block.id}: docs-test mark {key!r} needs an argument (a reason, a text)"
        if key == "response-of":
            assert block.lang == "json", f"{block.id}: response-of marks a json block"


def test_marks_are_found(tmp_path: pytest.TempPathFactory) -> None:
    doc = REPO / "README.md"
    assert "docs-test: skip" in doc.read_text(encoding="utf-8")
    skipped = [b for b in blocks("README.md") if b.skip_reason]
    assert skipped and all(b.runnable for b in skipped)
    inline = [b for b in blocks("QUICKSTART.md") if b.inline]
    assert inline and all(b.code.startswith("curl ") for b in inline)
