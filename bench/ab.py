"""ApacheBench (`ab`, apt package apache2-utils): a load generator that is not the bottleneck here."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any


def ab_binary() -> str:
    binary = shutil.which("ab")
    if binary is None:
        raise RuntimeError("ApacheBench is missing: apt-get install apache2-utils (make bench installs it)")
    return binary


def parse(report: str, percentiles_csv: str) -> dict[str, Any]:
    """Figures of one `ab` run from its report and its -e CSV (percent served within ms)."""

    def number(label: str) -> float:
        match = re.search(rf"^{label}:\s+([\d.]+)", report, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    within: dict[int, float] = {}
    for row in csv.reader(percentiles_csv.splitlines()[1:]):
        if len(row) == 2:
            within[int(float(row[0]))] = float(row[1])
    complete = int(number("Complete requests"))
    non_2xx = int(number("Non-2xx responses"))
    return {
        "requests": complete,
        # ab counts a response whose length differs from the first one's as failed: only
        # connection errors and non-2xx statuses are failures here.
        "failed": non_2xx + int(number(r"\s+\(Connect")) + int(number("Write errors")),
        "non_2xx": non_2xx,
        "requests_per_second": number("Requests per second"),
        "p50_ms": within.get(50),
        # ab's percentile table is meaningless below 100 requests.
        "p99_ms": within.get(99) if complete >= 100 else None,
        "keep_alive": int(number("Keep-Alive requests")),
    }


def run(
    url: str, requests: int, concurrency: int, body: bytes | None = None, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """`ab -n requests -c concurrency` on url (POST of a JSON body when given, else GET), keep-alive."""
    with tempfile.TemporaryDirectory(prefix="ab-") as tmp:
        out = Path(tmp) / "percentiles.csv"
        cmd = [ab_binary(), "-q", "-k", "-n", str(requests), "-c", str(concurrency), "-e", str(out)]
        if body is not None:
            (Path(tmp) / "body.json").write_bytes(body)
            cmd += ["-p", str(Path(tmp) / "body.json"), "-T", "application/json"]
        for name, value in (headers or {}).items():
            cmd += ["-H", f"{name}: {value}"]
        done = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"ab failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        figures = parse(done.stdout, out.read_text() if out.exists() else "")
    figures["concurrency"] = concurrency
    return figures
