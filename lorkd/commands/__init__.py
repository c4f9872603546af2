"""Command modules: the jobs behind the Hydra apps of :mod:`lorkd.cli` and their ``python -m`` entry points.

    python -m lorkd.commands.labels ckpt_path=CKPT [modality=ct] [json=true]      (= lorkd-labels)
    python -m lorkd.commands.check_manifest manifests=[train.jsonl,val.jsonl]     (manifest checker)

They are leaves: library code (``lorkd.data``, ``lorkd.inference``, ...) never imports them
(``tests/test_import_directions.py``).
"""
