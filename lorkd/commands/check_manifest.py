"""``python -m lorkd.commands.check_manifest manifests=[M1,M2] [regions=demo | ~regions] [require_masks=false] [quick=true]``:
every problem of each manifest as ``file:line: ...`` (:func:`lorkd.data.manifest.check`; the Hydra app is
:func:`lorkd.cli.check_manifest`, its config ``configs/check_manifest.yaml``)."""

if __name__ == "__main__":
    from lorkd.cli import check_manifest

    check_manifest()
