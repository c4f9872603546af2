"""Build the deterministic LoRKD demo data set: python scripts/make_demo_data.py --out DIR [--seed S] [--no-real]."""

from __future__ import annotations

import argparse
import logging
import time

from lorkd.data.demo import build_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, byte-identical files")
    parser.add_argument(
        "--no-real", action="store_true", help="synthetic phantoms only (skip LiTS-117 and MNI152)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    manifests = build_demo(args.out, seed=args.seed, real=not args.no_real)
    counts = ", ".join(f"{split} {len(rows)}" for split, rows in manifests.items())
    print(f"demo data in {args.out}: {counts} cases ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
