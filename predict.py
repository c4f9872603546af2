"""Segment scans with a trained model: ``python predict.py ckpt_path=CKPT input=PATH labels='[liver]' modality=ct output_dir=OUT``."""

from lorkd.cli import predict

if __name__ == "__main__":
    predict()
