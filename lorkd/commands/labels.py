"""``python -m lorkd.commands.labels ckpt_path=CKPT [modality=ct] [network=teacher] [json=true]``: the label
catalogue of a model (:mod:`lorkd.label_catalogue`) as a table or JSON, as ``lorkd-labels`` (:func:`lorkd.cli.labels`,
config ``configs/labels.yaml``)."""

if __name__ == "__main__":
    from lorkd.cli import labels

    labels()
