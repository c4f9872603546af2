"""Evaluate the demo teacher and the demo experts on the demo test set and print the per-region comparison.

    python scripts/demo_eval.py [eval.py overrides, e.g. metrics.space=preprocessed]

Needs ``outputs/demo/lorkd/checkpoints/last.ckpt`` (``make demo``); writes ``outputs/demo/eval/{teacher,lorkd}/``.
"""

import sys

from lorkd.evaluation.pipeline import compare_demo

if __name__ == "__main__":
    compare_demo(overrides=sys.argv[1:])
