"""Evaluate a checkpoint on a test manifest (Dice, NSD, reports): ``python eval.py ckpt_path=CKPT data.test_manifest=M output_dir=OUT``."""

from lorkd.cli import evaluate

if __name__ == "__main__":
    evaluate()
