"""Export a LoRKD checkpoint: one merged standalone model per region + peft adapters (same as ``lorkd-export``).

python scripts/export_experts.py ckpt_path=outputs/demo/lorkd/checkpoints/last.ckpt output_dir=outputs/demo/export
"""

from lorkd.cli import export

if __name__ == "__main__":
    export()
