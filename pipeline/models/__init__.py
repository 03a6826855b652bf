"""The model registry (pipeline.models.registry.registry.build_model): our architectures, torchvision's and timm's by name."""
