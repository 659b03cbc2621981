"""``python -m aiocomm.trace DIR [--chrome FILE]``: the verdict from the ranks'
records in DIR (``AIOCOMM_TRACE_DIR`` of the ranks, under any launcher), and
optionally the records as a Chrome trace for Perfetto or ``chrome://tracing``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .verdict import chrome_trace, read_dir, verdict


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aiocomm.trace",
        description="Say which rank is behind, from the records aiocomm ranks wrote to AIOCOMM_TRACE_DIR.",
    )
    parser.add_argument("directory", help="the ranks' AIOCOMM_TRACE_DIR (files rank-N.jsonl)")
    parser.add_argument("--chrome", metavar="FILE", default=None,
                        help="also write the records as a Chrome trace (one track per rank) to FILE")
    args = parser.parse_args(argv)
    records = read_dir(args.directory)
    if not records:
        print(f"no aiocomm records (rank-N.jsonl) in {args.directory}", file=sys.stderr)
        return 1
    for line in verdict(records):
        print(line)
    if args.chrome:
        with open(args.chrome, "w", encoding="utf-8") as f:
            json.dump(chrome_trace(records), f)
        print(f"Chrome trace written to {args.chrome} (open it in https://ui.perfetto.dev or chrome://tracing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
