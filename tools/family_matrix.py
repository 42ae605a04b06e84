"""Print the family x step matrix as a Markdown table: every keras-hub text family (tiny random
config, ``tiny:<family>``) through every step, each cell "ok" or the refusal's reason.

Runs every cell (not only CI's subset), with the same code as tests/test_families.py, and checks
the result against that module's EXPECTED_REFUSALS table (exit status 1 if they disagree).

    .venv/bin/python tools/family_matrix.py [--families bert,llama] [--steps export,generate] [--json out.json]

Takes about 20-40 minutes on 2 cores for the whole matrix.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from family_matrix import DECODERS, FAMILIES, STEPS, outcome, run_step  # noqa: E402
from test_families import EXPECTED_REFUSALS  # noqa: E402


def short(reason: str, limit: int = 200) -> str:
    reason = re.sub(r"/\S+", "<SavedModel>", reason).replace("|", "/")  # one note for the same reason
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--json", help="also write every cell's outcome to this file")
    ap.add_argument("--from-json", help="print the table of an earlier --json run instead of running")
    args = ap.parse_args(argv)
    families, steps = args.families.split(","), args.steps.split(",")
    results: dict[str, dict[str, list]] = json.loads(Path(args.from_json).read_text()) if args.from_json else {}
    mismatches = []
    for family in [] if args.from_json else families:
        for step in steps:
            if step == "generate" and family not in DECODERS:
                continue
            t0 = time.perf_counter()
            status, reason = outcome(run_step(family, step))
            seconds = time.perf_counter() - t0
            results.setdefault(family, {})[step] = [status, reason, round(seconds, 1)]
            print(f"{family} x {step}: {status} {reason} ({seconds:.1f}s)", file=sys.stderr, flush=True)
            expected = EXPECTED_REFUSALS.get((family, step))
            if (expected is None) != (status == "ok") or (expected and not re.search(expected, reason)):
                mismatches.append(f"{family} x {step}: {status} {reason} (table: {expected or 'ok'})")
    notes: dict[str, int] = {}
    rows = ["| family | " + " | ".join(steps) + " |", "|---" * (len(steps) + 1) + "|"]
    for family in families:
        cells = []
        for step in steps:
            if step not in results.get(family, {}):
                cells.append("-")
                continue
            status, reason, _ = results[family][step]
            if status == "ok":
                cells.append("ok")
            else:
                n = notes.setdefault(short(reason), len(notes) + 1)
                cells.append(f"refused ({n})")
        rows.append(f"| {family} | " + " | ".join(cells) + " |")
    print("\n".join(rows))
    if notes:
        print()
        for reason, n in notes.items():
            print(f"{n}. {reason}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if mismatches:
        print("\nDisagrees with EXPECTED_REFUSALS in tests/test_families.py:\n" + "\n".join(mismatches), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
