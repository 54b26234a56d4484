"""LightningCLI entry point: python -m src.cli {fit,validate,test,predict} --config configs/visor.yaml"""
from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from src.data.datamodule import VQADataModule
from src.lit.module import VisorLitModule


class VisorCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # One shared size: the image resolution the data is decoded to is the encoder's input size.
        parser.link_arguments("data.image_size", "model.lvlm.init_args.vision.init_args.image_size")


def main(args=None) -> VisorCLI:
    return VisorCLI(VisorLitModule, VQADataModule, save_config_kwargs={"overwrite": True}, args=args)


if __name__ == "__main__":
    main()
