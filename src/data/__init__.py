"""Synthetic generator, shard writer/reader, tokenizer and datamodule."""
from src.data.datamodule import VQADataModule
from src.data.generator import GeneratorConfig, SceneGenerator
from src.data.tokenizer import WordTokenizer

__all__ = ["VQADataModule", "GeneratorConfig", "SceneGenerator", "WordTokenizer"]
