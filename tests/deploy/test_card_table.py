"""DEPLOYMENT.md's card table is what `plan` prints for each card, row by row."""

from __future__ import annotations

import re

from tests.deploy.card_table import CARDS, HEADER, row
from tests.deploy.conftest import REPO

BLOCK = re.compile(r"<!-- card-table: [^>]*-->\n(.*?)<!-- /card-table -->", re.S)


def documented_rows() -> list[str]:
    match = BLOCK.search((REPO / "DEPLOYMENT.md").read_text())
    assert match is not None, "DEPLOYMENT.md lost its card-table markers"
    lines = match.group(1).strip().splitlines()
    assert "\n".join(lines[:2]) == HEADER
    return lines[2:]


def test_every_row_is_plans_output() -> None:
    documented = documented_rows()
    assert len(documented) == len(CARDS)
    for line, card in zip(documented, CARDS, strict=True):
        assert line == row(*card), (
            f"DEPLOYMENT.md's row for {card[0]} differs from `plan`: run python -m tests.deploy.card_table"
        )


def test_the_cards_are_the_ones_the_docs_name() -> None:
    names = {name.split(",")[0] for name, _, _ in CARDS}
    assert {"L4", "A10G", "RTX 4090", "L40S", "A100 40GB", "A100 80GB", "H100 80GB", "H200"} <= names
    reports = {name: gib for name, gib, settings in CARDS if not settings}
    assert reports["L4"] == 22.05 and reports["RTX 4090"] == 23.52
