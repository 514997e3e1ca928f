"""mtl_meniscus: meniscus tear classification on sagittal knee MRI (shared trunk vs three-CNN cascade)."""

__version__ = "0.1.0"
