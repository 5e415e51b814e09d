"""Real ImageNet predictions for the castle photo, where a weights file is present (skipped otherwise).

Set REAL_WEIGHTS=/path/to/resnet50_weights_tf_dim_ordering_tf_kernels.h5, or have Keras's cached copy
in ~/.keras/models/. The original project reported for this photo: church 0.4136, castle 0.3930,
monastery 0.1733, palace 0.0041, vault 0.0034.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imgserve.imaging.prepare import prepare_image
from tools.processes import CASTLE

pytestmark = pytest.mark.system

KERAS_CACHE = Path.home() / ".keras" / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels.h5"


def weights_file() -> Path | None:
    candidate = Path(os.environ.get("REAL_WEIGHTS", KERAS_CACHE))
    return candidate if candidate.is_file() else None


@pytest.mark.skipif(weights_file() is None, reason="no ResNet50 ImageNet weights file (set REAL_WEIGHTS)")
@pytest.mark.skipif(not CASTLE.exists(), reason="../shared/images/castle_image.jpg is absent")
def test_castle_photo_is_a_church_or_castle_with_real_weights():
    from imgserve.worker.model import Classifier

    classifier = Classifier(str(weights_file()))
    [top5] = classifier.classify(prepare_image(CASTLE.read_bytes())[None])
    labels = [p["label"] for p in top5]
    assert labels[0] in ("church", "castle"), top5
    assert {"church", "castle", "monastery"} <= set(labels), top5
