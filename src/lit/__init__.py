"""LightningModules and callbacks."""
from src.lit.callbacks import ExportCheckpoint
from src.lit.module import VisorLitModule

__all__ = ["ExportCheckpoint", "VisorLitModule"]
