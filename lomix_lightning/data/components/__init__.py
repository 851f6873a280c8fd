"""The parts the data modules are built from.

Slice and volume datasets, transforms, multi-scale batches, splits, list files, array files, image/mask pairing,
seeded loaders and the argument and label checks.
"""
