"""Agreement of the `gsm8k` scorer with the correctness flags recorded in the RouteLLM GSM8K log.

    python bench/scorer_agreement.py [PATH] [--examples N]

PATH defaults to ../shared/data/routellm_gsm8k (FUSION_LIGHTNING_SHARED_DATA overrides the data
root). Prints agreement per model and overall, then every disagreement classified:

- flag_wrong/decimal_zeros: we score 1; the answer is written "37.00" — the recorded grader reads
  the last run of digits ("00") and marks it wrong;
- flag_wrong/text_after_answer: we score 1; the number right after "####" is the gold, but
  explanation with more numbers follows it ("#### 225 minutes or 3 hours and 45 minutes");
- flag_wrong/digits_only_match: we score 0; the answer after "####" differs in value but ends in
  the gold's digits (0.5 for 5, 0.84 for 84, -15 for 15, 7.8 for 8) — the recorded grader accepted it;
- scorer_wrong/answer_not_last: we score 0 but the answer was right; the response (no "####")
  states it and then ends with other numbers (e.g. restating the question's "1/3 pound");
- other.

It also checks the explanation: "the last run of digits (commas removed) equals the gold" reproduces
the recorded flags almost exactly.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

from fusion_lightning.data.arrow import as_objects
from fusion_lightning.data.logtable import load_logs
from fusion_lightning.scoring.numeric import (
    gsm8k,
    gsm8k_answer,
    gsm8k_gold,
    number_value,
    numbers,
    numbers_equal,
)

SHARED = Path(os.environ.get("FUSION_LIGHTNING_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CLASSES = ("flag_wrong/decimal_zeros", "flag_wrong/text_after_answer", "flag_wrong/digits_only_match",
           "scorer_wrong/answer_not_last", "other")


def recorded_grader(response: str, gold: str) -> float:
    """Our reconstruction of the grader behind the recorded flags: last digit run == gold digits."""
    runs = re.findall(r"\d+", (response or "").replace(",", ""))
    return float(bool(runs) and runs[-1] == (gsm8k_gold(gold) or "").lstrip("-"))


def classify(response: str, gold: str, flag: float, ours: float) -> str:
    pred, want = gsm8k_answer(response), gsm8k_gold(gold)
    if ours == 1.0 and flag == 0.0:
        if pred and re.fullmatch(r"-?\d+\.0+", pred):
            return CLASSES[0]
        if "####" in response and len(numbers(response.rsplit("####", 1)[1])) > 1:
            return CLASSES[1]
    if ours == 0.0 and flag == 1.0:
        stated = any(numbers_equal(number_value(x), number_value(want)) for x in numbers(response))
        if "####" not in response and stated:
            return CLASSES[3]
        if pred and want and re.findall(r"\d+", pred)[-1:] == [want.lstrip("-")]:
            return CLASSES[2]
    return CLASSES[4]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", nargs="?", default=str(SHARED / "routellm_gsm8k"))
    ap.add_argument("--examples", type=int, default=1, help="example responses to print per class")
    args = ap.parse_args()
    if not Path(args.path).exists():
        print(f"{args.path}: not found (set FUSION_LIGHTNING_SHARED_DATA or pass PATH)")
        return 1
    t = load_logs("routellm", args.path).table
    models = as_objects(t["model"])
    responses = t["response"].to_pylist()
    golds = as_objects(t["ground_truth"])
    flags = t["performance"].to_pylist()

    agree, total, grader_agree = Counter(), Counter(), 0
    classes: dict[str, Counter] = defaultdict(Counter)
    examples: dict[str, list] = defaultdict(list)
    for m, r, g, flag in zip(models, responses, golds, flags, strict=True):
        ours = gsm8k(r, g)
        total[m] += 1
        agree[m] += ours == flag
        grader_agree += recorded_grader(r, g) == flag
        if ours != flag:
            c = classify(r, g, flag, ours)
            classes[m][c] += 1
            examples[c].append((m, flag, ours, gsm8k_answer(r), gsm8k_gold(g), r))

    print(f"gsm8k scorer vs recorded RouteLLM flags ({args.path})\n")
    print(f"{'model':<40} {'rows':>6} {'agree':>6} {'agreement':>10}")
    for m in sorted(total):
        print(f"{m:<40} {total[m]:>6} {agree[m]:>6} {agree[m] / total[m]:>10.2%}")
    n, a = sum(total.values()), sum(agree.values())
    print(f"{'all':<40} {n:>6} {a:>6} {a / n:>10.2%}\n")
    print(f"{'disagreement class':<32}" + "".join(f" {m.split('/')[-1][:22]:>23}" for m in sorted(total)) + "    all")
    for c in CLASSES:
        counts = [classes[m][c] for m in sorted(total)]
        print(f"{c:<32}" + "".join(f" {x:>23}" for x in counts) + f" {sum(counts):>6}")
    fixed = a + sum(classes[m][c] for m in total for c in CLASSES if c.startswith("flag_wrong"))
    print(f"\nagreement counting the flag_wrong classes as agreeing: {fixed}/{n} ({fixed / n:.2%})")
    print(f"recorded flags reproduced by 'last digit run == gold': {grader_agree}/{n} ({grader_agree / n:.2%})")
    for c in CLASSES:
        for m, flag, ours, pred, want, r in examples[c][: args.examples]:
            tail = r.strip()[-240:].replace("\n", " ⏎ ")
            print(f"\n[{c}] {m}: flag={flag:g} ours={ours:g} our answer={pred} gold={want}\n  ...{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
