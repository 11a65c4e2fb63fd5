"""How many evaluation traces contain a plan step whose command does not lead to its own
description (or does not parse), and how many of those traces fail the checker.

  python scripts/plan_consistency.py REPORT_DIR/results.json [...]
"""

import json
import re
import sys

from strokes_jax.worlds import grammar

STEP = re.compile(r"<ins> (.*?) </ins> <des> (.*?) </des>")


def inconsistent(text: str) -> bool:
    state = ()
    for ins, des in STEP.findall(text):
        try:
            planned = grammar.parse_description(des)
            if set(grammar.parse_command(ins).apply(state)) != set(planned):
                return True
        except grammar.GrammarError:
            return True
        state = planned
    return False


def main(paths):
    for path in paths:
        samples = json.load(open(path))["samples"]["process"]
        bad = [s for s in samples if inconsistent(s["text"])]
        print(f"{path}: {len(samples)} traces, {len(bad)} with an inconsistent plan step, "
              f"{sum(not s['correct'] for s in bad)} of them failing")


if __name__ == "__main__":
    main(sys.argv[1:])
