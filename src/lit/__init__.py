"""LightningModules and callbacks."""
from src.lit.callbacks import ExportCheckpoint
from src.lit.module import VisorLitModule
from src.lit.policy_module import PolicyLitModule

__all__ = ["ExportCheckpoint", "PolicyLitModule", "VisorLitModule"]
