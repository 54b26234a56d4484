"""LightningModules and callbacks."""
from src.lit.callbacks import ExportCheckpoint
from src.lit.visor_module import VisorLitModule
from src.lit.policy_module import PolicyLitModule
from src.lit.predict import JsonlPredictionWriter

__all__ = ["ExportCheckpoint", "JsonlPredictionWriter", "PolicyLitModule", "VisorLitModule"]
