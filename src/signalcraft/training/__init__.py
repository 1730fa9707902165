"""Model training: the Demucs separator (``training.separator``)."""
