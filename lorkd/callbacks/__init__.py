"""Lightning callbacks (prediction writer, metrics writer) as ``lorkd.callbacks``.

Their code lives in the repository's top-level ``callbacks/`` folder. An installed package has that
folder's files here (``setup.py`` maps it onto ``lorkd.callbacks``); in a checkout this file points the
package at the folder. ``lorkd`` itself never imports these callbacks; configs name them by ``_target_``.
"""

from pathlib import Path

__path__ = [str(Path(__file__).resolve().parents[2] / "callbacks")]
