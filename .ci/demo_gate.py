"""CI's quality gate on the README's quick start: the demo's model (configs/cpu_best.yaml at
1000 iterations) must beat the classical threshold baseline on the demo's held-out test
phantom by a clear margin, or the recipe has stopped earning its place.

    python .ci/demo_gate.py DEMO_DIR [--margin 0.02]

One training of minutes, so it runs once in CI beside the test suite rather than inside it
(the suite's time is the one every change waits for).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# the baseline must be a real competitor: chance (a third, 3 classes) + 0.3
BASELINE_FLOOR = 1 / 3 + 0.3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("demo_dir", type=Path)
    p.add_argument("--margin", type=float, default=0.02)
    args = p.parse_args(argv)
    model, baseline = (json.loads((args.demo_dir / f"eval_{name}.json").read_text())["miou"]
                       for name in ("model", "threshold"))
    verdict = (f"demo: model mIoU {model:.4f}, threshold baseline {baseline:.4f} "
               f"({model - baseline:+.4f}; the gate asks for +{args.margin} and a baseline "
               f"above {BASELINE_FLOOR:.3f})")
    if baseline > BASELINE_FLOOR and model > baseline + args.margin:
        print(f"{verdict}: passed")
        return 0
    print(f"{verdict}: FAILED", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
