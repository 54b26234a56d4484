"""The whole training path can fit data: a small VISOR model memorises a fixed batch of
generated questions. The same question text recurs with different answers across images
("what color is the background ?"), so fitting needs the image path (encoder -> projector ->
self and gated cross layers) to carry information; a detached path or a gate stuck at zero
fails it. (Label alignment itself is checked in tests/data/test_data.py.)"""
import torch
import torch.nn.functional as F

from src.data.generator import vocabulary
from src.data.shards import QAExpander, collate, qa_dataset, write_generated_split
from src.data.tokenizer import WordTokenizer
from src.metrics import exact_match
from src.models import DecoderConfig, LayerPlan, VisionEncoder, VisorLVLM


def test_small_model_memorises_a_batch(tmp_path):
    torch.manual_seed(0)
    tok = WordTokenizer(vocabulary())
    urls = write_generated_split(tmp_path, "train", 6, seed=0, images_per_shard=6)
    samples = list(qa_dataset(urls, QAExpander(tok, 64, 24)))[:32]
    batch = collate(samples, tok.pad_id)
    model = VisorLVLM(VisionEncoder("test_byobnet", 2, 64, pos_embed="learned"),
                      DecoderConfig(vocab_size=64, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2,
                                    intermediate_size=128),
                      LayerPlan(2, self_layers=[0], cross_layers=[1]), pos_conv=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(120):
        logits = model(batch["images"], batch["input_ids"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = exact_match(model(batch["images"], batch["input_ids"]), batch["labels"]).float().mean().item()
    assert loss.item() < 0.1 and acc > 0.9, (loss.item(), acc)
