"""Pixels: prepare.py turns an upload into the model's input (Pillow); codecs.py packs pixels into a job.

The model input's shape lives here, apart from both, so that the protocol can check a job's shape
without loading Pillow.
"""

IMAGE_SIZE = (224, 224)
IMAGE_SHAPE = (224, 224, 3)
IMAGE_DTYPE = "uint8"
