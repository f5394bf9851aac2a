"""The markdown report of `make gpu-check` (scripts/gpu_check.sh) from the files it left in OUT."""
from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def section(title: str, body: str) -> str:
    return f"### {title}\n\n{body.strip()}\n"


def main(out: Path) -> int:
    parts = ["## GPU check", ""]
    gpu = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else "unknown"
    parts.append(f"GPU: {gpu}\n")
    versions = out / "versions.log"
    if versions.exists():
        parts.append("```\n" + versions.read_text().strip()[-1000:] + "\n```\n")
    parts.append(section("Steps", "| step | result | time |\n|---|---|---|\n" + (out / "steps.md").read_text()))
    junit = out / "junit.xml"
    if junit.exists():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        rows = [f"| {c.get('classname')}::{c.get('name')} | "
                f"{'FAILED' if c.find('failure') is not None or c.find('error') is not None else 'skipped' if c.find('skipped') is not None else 'passed'}"
                f" | {float(c.get('time', 0)):.1f} s |" for c in suite.iter("testcase")]
        parts.append(section(f"Integration tests ({suite.get('tests')} tests, {suite.get('failures')} failures, "
                             f"{suite.get('errors')} errors)", "| test | result | time |\n|---|---|---|\n" + "\n".join(rows)))
    for name in ("bench_serving", "bench_alignment"):
        log = out / f"{name}.log"
        if log.exists():
            tables = [line for line in log.read_text().splitlines() if re.match(r"^\s*\|", line) or line.startswith("#")]
            parts.append(section(name, "\n".join(tables) or log.read_text()[-2000:]))
    print("\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "out/gpu-check")))
