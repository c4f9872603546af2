"""Train a SAT teacher or decompose one into LoRKD region experts: ``python train.py experiment=<name>``."""

from lorkd.cli import train

if __name__ == "__main__":
    train()
