"""Data dir -> batches: datasets, transforms and the loaders (pipeline.data.loaders.loaders), on the CPU or decoded on
the device (pipeline.data.loaders.device_decode)."""
