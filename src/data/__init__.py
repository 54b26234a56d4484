"""Synthetic generator, shard writer/reader, tokenizers, datamodule and the LLaVA converter."""
from src.data.datamodule import VQADataModule
from src.data.generator import GeneratorConfig, SceneGenerator
from src.data.tokenizer import ChatTokenizer, HFTokenizer, WordTokenizer, load_tokenizer

__all__ = ["VQADataModule", "GeneratorConfig", "SceneGenerator", "ChatTokenizer", "HFTokenizer", "WordTokenizer",
           "load_tokenizer"]
