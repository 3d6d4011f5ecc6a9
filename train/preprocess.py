"""Training's name for the shared preprocessing (defined once, torch-free, in cellcore.preprocess)."""
from cellcore.preprocess import (  # noqa: F401
    IMAGENET_MEAN, IMAGENET_STD, INPUT_NORMS, INTERPOLATIONS, RESIZE_POLICIES, Preprocessing, cell_box, crop_resize,
)
