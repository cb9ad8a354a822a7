"""Data: manifests, presets, the region pipeline and synthetic phantoms."""
