"""nn.Modules only (no Lightning)."""
from src.models.decoder import Decoder, DecoderConfig
from src.models.lvlm import VisorLVLM
from src.models.plan import LayerPlan, PlanError
from src.models.projector import Projector, VisualPosConv
from src.models.token_reduction import (AvgPoolReducer, FastVReducer, RandomReducer, TokenReducer,
                                       VisionZipReducer)
from src.models.vision import VisionEncoder

__all__ = ["Decoder", "DecoderConfig", "VisorLVLM", "LayerPlan", "PlanError", "Projector", "VisualPosConv",
           "AvgPoolReducer", "FastVReducer", "RandomReducer", "TokenReducer", "VisionZipReducer", "VisionEncoder"]
