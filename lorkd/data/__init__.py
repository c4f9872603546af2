"""Data: manifests, preprocessing (and its inversion), the preprocessing cache, training patches,
the region sampler, the DataModule and the demo data set.

Submodules are imported explicitly (``from lorkd.data.manifest import load_manifest``); this package
imports nothing on its own so that light users (manifest checks, the sampler) never pay MONAI's
import cost.
"""
