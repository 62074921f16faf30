"""Data: loading image datasets (`loading`: local files, Hub sets, streams, scikit-learn digits), image transforms
(`transforms`) and prepared, seeded-augmentation datasets (`prepared`). `hf_vit_compress.data` re-exports the
public API of all three."""

from .loading import *  # noqa: F403  (the public data API, listed in loading.__all__)
from .loading import __all__  # noqa: F401
