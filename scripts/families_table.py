"""Generate the "Supported pipelines" table (docs/pipelines.md) from the family cases the tests run.

    python scripts/families_table.py                 # run every family, print the table
    python scripts/families_table.py --write         # ... and write it into docs/pipelines.md
    python scripts/families_table.py --json out.json # ... and keep the measured rows
    python scripts/families_table.py --from-json out.json --write   # render saved rows, run nothing
    python scripts/families_table.py --from-json out.json --only sd3 --json out.json --write
                                                     # re-run some families, keep the other rows

Each family runs the registry's ``run_family`` (the same function ``tests/test_families.py``
asserts on), on the CPU with ``aot_eager``; a full run takes a few minutes on 2 cores.
``tests/test_families.py`` checks that the page's table equals the one its own runs render, so the
docs cannot drift from what the code does.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "pipelines.md"


def main(argv: list[str] | None = None) -> int:
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    # The registry lives beside the tests (tests/families.py), not in the shipped package.
    from families import FAMILIES, FamilyResult, case, render_table, run_family, with_table

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--write", action="store_true", help="write the table into docs/pipelines.md")
    parser.add_argument("--json", type=Path, help="also write the measured rows to this JSON file")
    parser.add_argument("--from-json", type=Path, help="render rows saved by --json (or the tests) instead")
    parser.add_argument("--only", nargs="*", help="run only these family keys (not with --write)")
    args = parser.parse_args(argv)
    if args.write and args.only and args.from_json is None:
        parser.error("--write needs every family: drop --only, or give --from-json for the other rows")

    saved: dict[str, FamilyResult] = {}
    if args.from_json is not None:
        saved = {row["key"]: FamilyResult(**row) for row in json.loads(args.from_json.read_text())}
        for key, row in saved.items():  # notes are the registry's, as in a fresh run
            row.notes = case(key).notes
    if args.from_json is None or args.only:
        import torch

        logging.getLogger("CACHE_DIT").setLevel(logging.WARNING)
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
        for family in FAMILIES:
            if args.only and family.key not in args.only:
                continue
            torch._dynamo.reset()  # graph counts per family, as in the tests
            started = time.perf_counter()
            saved[family.key] = run_family(family)
            print(f"{family.key}: {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
    results = [saved[f.key] for f in FAMILIES if f.key in saved]
    missing = [f.key for f in FAMILIES if f.key not in saved]
    if args.write and missing:
        parser.error(f"--write needs every family; no rows for {', '.join(missing)}")
    if args.json is not None:
        args.json.write_text(json.dumps([r.as_dict() for r in results], indent=1))
    table = render_table(results)
    print(table)
    if args.write:
        PAGE.write_text(with_table(PAGE.read_text(), table))
        print(f"wrote {PAGE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
