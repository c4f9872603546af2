"""Convert an official ``lorkd-imbalance-{nano,pro}.pth`` into one of our LoRKD checkpoints (``configs/convert.yaml``).

python scripts/convert_lorkd_official.py ckpt_path=lorkd-imbalance-pro.pth output_path=lorkd-pro.ckpt \
    official.text_checkpoint=pro_text_encoder.pth official.language_model_path=/models/BioLORD-2023-C \
    [official.teacher_checkpoint=SAT_Pro.pth]

The result works with predict.py / eval.py (ckpt_path=...), lorkd-export, and fine-tuning
(``python train.py experiment=pro model.experts.style=lorkd model.student_init=checkpoint
model.student_state.path=lorkd-pro.ckpt``).
"""

from lorkd.cli import convert

if __name__ == "__main__":
    convert()
