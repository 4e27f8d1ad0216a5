"""Compare two evaluations of the same scenes scene by scene: is model B really better than model A?

    python examples/evaluate.py --model A --n 256 --out outputs/eval_a.json
    python examples/evaluate.py --model B --n 256 --out outputs/eval_b.json
    python examples/compare_evaluations.py outputs/eval_a.json outputs/eval_b.json

Prints each metric's mean for A and B and the paired difference B - A with its standard error
(`paired_differences`). A difference within about two standard errors of 0 is not a result.
"""

import argparse
import json
import math
from pathlib import Path

from evaluate import TABLE_ROWS, format_number  # examples/ is on sys.path when this file runs as a script

from nanoi2v_diffusers.evaluation.shapes_metrics import paired_differences


def format_comparison(results_a: dict, results_b: dict, name_a: str = "A", name_b: str = "B") -> str:
    """Markdown table: metric, A's mean, B's mean, B - A +- its paired standard error."""
    differences = paired_differences(results_a["scenes"], results_b["scenes"])
    lines = [f"| metric | {name_a} | {name_b} | {name_b} - {name_a} +- standard error |", "|---|---|---|---|"]
    for key, label, _ in TABLE_ROWS:
        if key not in differences:
            continue  # the Frechet distance is one number per set; no text-swap without partners
        mean, error = differences[key]
        cells = [format_number(float(results["model"][key])) for results in (results_a, results_b)]
        difference = f"{mean:+.3f} +- {format_number(error)}" if math.isfinite(mean) else "n/a"
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {difference} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path, help="evaluate.py JSON of the reference")
    parser.add_argument("b", type=Path, help="evaluate.py JSON of the model compared with it")
    args = parser.parse_args(argv)
    results_a, results_b = (json.loads(path.read_text()) for path in (args.a, args.b))
    table = format_comparison(results_a, results_b, args.a.stem, args.b.stem)
    print(table)
    return table


if __name__ == "__main__":
    main()
