"""Compare two evaluations of the same scenes scene by scene: is model B really better than model A?

    nanoi2v evaluate --model A --num_scenes 256 --output outputs/eval_a.json
    nanoi2v evaluate --model B --num_scenes 256 --output outputs/eval_b.json
    python examples/compare_evaluations.py outputs/eval_a.json outputs/eval_b.json

Prints each metric's mean for A and B and the paired difference B - A with its standard error
(`paired_differences`). A difference within about two standard errors of 0 is not a result.
"""

import argparse
import json
from pathlib import Path

from nanoi2v_diffusers.evaluation.report import format_comparison


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path, help="evaluation JSON of the reference")
    parser.add_argument("b", type=Path, help="evaluation JSON of the model compared with it")
    args = parser.parse_args(argv)
    results_a, results_b = (json.loads(path.read_text()) for path in (args.a, args.b))
    table = format_comparison(results_a, results_b, args.a.stem, args.b.stem)
    print(table)
    return table


if __name__ == "__main__":
    main()
