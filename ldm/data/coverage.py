"""Check from consumed-keys logs (data.consumed_log) how often each sample was trained on, per epoch.

    python -m ldm.data.coverage LOG_DIR_OR_FILE... [--shards SPEC]

Lines of an interrupted run after the step its successor resumed from were
trained again, so they are dropped first (a line is superseded by a later
{"resume": step} record when its step is greater). Prints one JSON line per
epoch: batches per rank, samples used, used twice or more, and with --shards
the samples never used. Exits 1 when any sample was used twice in an epoch.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def read_log(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every record of the given .jsonl files and directories of them."""
    records = []
    for path in map(Path, paths):
        files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        for file in files:
            records += [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    return records


def effective(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Step records whose batches still count: none that a later resume from an earlier step redid."""
    resumes = [(r["time"], r["resume"]) for r in records if "resume" in r]
    return [r for r in records if "keys" in r
            and not any(t > r["time"] and r["step"] > step for t, step in resumes)]


def coverage(records: Sequence[dict[str, Any]], all_keys: set[str] | None = None) -> dict[int, dict[str, Any]]:
    """Per epoch: {"batches_per_rank", "used", "twice", "never"} (never: None without all_keys)."""
    out: dict[int, dict[str, Any]] = {}
    for epoch in sorted({r["epoch"] for r in records if "keys" in r}):
        lines = [r for r in effective(records) if r["epoch"] == epoch]
        uses = Counter(k for r in lines for k in r["keys"])
        out[epoch] = {
            "batches_per_rank": dict(sorted(Counter(r["rank"] for r in lines).items())),
            "used": len(uses),
            "twice": sum(1 for n in uses.values() if n > 1),
            "never": len(all_keys - set(uses)) if all_keys is not None else None,
        }
    return out


def shard_keys(spec: str) -> set[str]:
    from ldm.data.shards import expand_shards, read_samples

    return {s["__key__"] for url in expand_shards(spec) for s in read_samples(url, lambda ext: True)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+", help="data.consumed_log directories or their rank<r>.jsonl files")
    parser.add_argument("--shards", help="the training shards, to count the samples never used")
    args = parser.parse_args(argv)
    report = coverage(read_log(args.logs), shard_keys(args.shards) if args.shards else None)
    for epoch, row in report.items():
        print(json.dumps({"epoch": epoch, **row}))
    return 1 if any(row["twice"] for row in report.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
