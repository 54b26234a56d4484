"""Command-line overrides shared by the tests that run real LightningCLI fits on tiny generated data."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_ENCODER = str(ROOT / "checkpoints/encoder/model.safetensors")
# 40 training and 8 validation images in two shards, read in the main process
TINY_DATA = ["--data.train_images", "40", "--data.val_images", "8", "--data.images_per_shard", "20",
             "--data.num_workers", "0", "--data.batch_size", "4", "--data.val_batch_size", "8"]
# the configs name the encoder relative to the repository root; tests run elsewhere
ENCODER_FROM_REPO = ["--model.lvlm.init_args.vision.init_args.weights_path", SHIPPED_ENCODER]
# two CPU ranks over gloo: 40 training and 10 validation images in four shards each way, in the main process
TWO_RANK_DATA = ["--data.train_images", "40", "--data.val_images", "10", "--data.images_per_shard", "10",
                 "--data.num_workers", "0", "--data.batch_size", "4", "--data.val_batch_size", "8"]


def on_cpu(devices: int, strategy: str = None) -> list:
    """The overrides that run a command on `devices` CPU processes (with configs/strategy/<strategy>.yaml)."""
    return ["--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
            *(["--config", str(ROOT / f"configs/strategy/{strategy}.yaml")] if strategy else [])]
