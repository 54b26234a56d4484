"""Command-line overrides shared by the tests that run real LightningCLI fits on tiny generated data."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_ENCODER = str(ROOT / "checkpoints/encoder/model.safetensors")
# 40 training and 8 validation images in two shards, read in the main process
TINY_DATA = ["--data.train_images", "40", "--data.val_images", "8", "--data.images_per_shard", "20",
             "--data.num_workers", "0", "--data.batch_size", "4", "--data.val_batch_size", "8"]
# the configs name the encoder relative to the repository root; tests run elsewhere
ENCODER_FROM_REPO = ["--model.lvlm.init_args.vision.init_args.weights_path", SHIPPED_ENCODER]
