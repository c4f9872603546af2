"""Command modules: the jobs behind the Hydra apps of :mod:`lorkd.cli` (``predict``: python predict.py;
``evaluate``: python eval.py; ``export``: lorkd-export and the official-LoRKD converter) and the ``python -m``
entry points:

    python -m lorkd.commands.labels ckpt_path=CKPT [modality=ct] [json=true]      (= lorkd-labels)
    python -m lorkd.commands.check_manifest manifests=[train.jsonl,val.jsonl]     (manifest checker)

They are leaves: library code (``lorkd.data``, ``lorkd.inference``, ...) never imports them
(``tests/test_import_directions.py``).
"""
