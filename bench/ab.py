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


def _ab(options: list[str], url: str, tmp: Path, body: bytes | None, headers: dict[str, str] | None) -> str:
    """Run `ab` with `options` on url (POST of a JSON body when given, else GET); its stdout."""
    cmd = [ab_binary(), *options]
    if body is not None:
        (tmp / "body.json").write_bytes(body)
        cmd += ["-p", str(tmp / "body.json"), "-T", "application/json"]
    for name, value in (headers or {}).items():
        cmd += ["-H", f"{name}: {value}"]
    done = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ab failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout


def run(
    url: str, requests: int, concurrency: int, body: bytes | None = None, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """`ab -n requests -c concurrency` on url (POST of a JSON body when given, else GET), keep-alive."""
    with tempfile.TemporaryDirectory(prefix="ab-") as tmp:
        out = Path(tmp) / "percentiles.csv"
        options = ["-q", "-k", "-n", str(requests), "-c", str(concurrency), "-e", str(out)]
        report = _ab(options, url, Path(tmp), body, headers)
        figures = parse(report, out.read_text() if out.exists() else "")
    figures["concurrency"] = concurrency
    return figures


def burst(url: str, requests: int, body: bytes | None = None, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """`requests` requests sent at once (`ab -n requests -c requests`, a new connection each): every
    response's status and Retry-After (from `ab -v 2`'s header log) and every request's time in ms
    (from `ab -g`, connect to last byte), sorted. ab's own work per request is a few microseconds of C,
    so the times are the server's and the machine's, not a Python client's."""
    with tempfile.TemporaryDirectory(prefix="ab-") as tmp:
        times = Path(tmp) / "times.tsv"
        options = ["-v", "2", "-n", str(requests), "-c", str(requests), "-g", str(times)]
        log = _ab(options, url, Path(tmp), body, headers)
        return parse_burst(log, times.read_text())


def parse_burst(log: str, times_tsv: str) -> dict[str, Any]:
    """Statuses and Retry-After counts from `ab -v 2`'s "header received" blocks; sorted ms from `-g`."""
    statuses: dict[str, int] = {}
    retry_after: dict[str, int] = {}
    for block in log.split("LOG: header received:")[1:]:
        lines = block.strip().splitlines()
        parts = lines[0].split() if lines else []
        status = parts[1] if len(parts) > 1 else "?"
        statuses[status] = statuses.get(status, 0) + 1
        if any(line.lower().startswith("retry-after:") for line in lines[1:]):
            retry_after[status] = retry_after.get(status, 0) + 1
    ms = sorted(int(row.split("\t")[4]) for row in times_tsv.splitlines()[1:] if row.count("\t") >= 5)
    return {"statuses": statuses, "retry_after": retry_after, "ms": ms}
