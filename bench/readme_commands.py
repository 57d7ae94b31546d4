"""Every command of README.md and docs/*.md, and what tests/test_readme.py does with it.

    python bench/readme_commands.py            # each command: page, run or skip (and why); counts per page
    python bench/readme_commands.py --run      # also runs tests/test_readme.py: passed / skipped / failed per page

The counts are what an issue's closing note reports for the documentation: how many commands the test runs
as typed, how many it skips with a reason (a GPU, a cluster, the internet), and, with --run, how many failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_readme import COMMANDS, command_ids, skip_reason, status  # noqa: E402


def listing() -> Counter:
    """Print every command with its status; return the (page, status) counts."""
    counts: Counter = Counter()
    for test_id, (page, lang, command) in zip(command_ids(COMMANDS), COMMANDS, strict=True):
        state = status(lang, command)
        counts[page, state] += 1
        shown = command.strip().splitlines()[0] + (" ..." if "\n" in command.strip() else "")
        reason = f"  ({skip_reason(command)})" if state == "skip" else ""
        print(f"{test_id:18} {state:7} {shown[:110]}{reason[:160]}")
    return counts


def run_tests(timeout: float) -> Counter:
    """Run the README test; return (page, outcome) counts from its JUnit report."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                        str(ROOT / "tests" / "test_readme.py"), "-k", "test_readme_command"],
                       cwd=ROOT, timeout=timeout, check=False)
        outcomes: Counter = Counter()
        for case in ET.parse(report).getroot().iter("testcase"):
            name = case.get("name", "")
            if not name.startswith("test_readme_command["):
                continue
            page = name[len("test_readme_command["):].rsplit("-", 1)[0]
            kind = "skipped" if case.find("skipped") is not None else (
                "failed" if case.find("failure") is not None or case.find("error") is not None else "passed")
            outcomes[page, kind] += 1
        return outcomes


def table(counts: Counter, columns: list[str]) -> None:
    page_names = list(dict.fromkeys(page for page, _, _ in COMMANDS))
    print("\n| page | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for page in [*page_names, "all"]:
        row = [sum(counts[p, c] for p in page_names) if page == "all" else counts[page, c] for c in columns]
        print(f"| {page} | " + " | ".join(str(n) for n in row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="store_true", help="also run tests/test_readme.py and count its outcomes")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole test run")
    args = parser.parse_args()
    counts = listing()
    table(counts, ["run", "skip", "unknown"])
    if args.run:
        table(run_tests(args.timeout), ["passed", "skipped", "failed"])


if __name__ == "__main__":
    main()
