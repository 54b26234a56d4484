"""End-to-end LLM benchmark at a real model's size: what a user of VISOR gets in wall-clock.

    python experiments/bench/bench_e2e.py                     # CPU, fp32, the whole grid (~40 min on 2 cores)
    python experiments/bench/bench_e2e.py --device cuda --dtype bfloat16     # a GPU
    python experiments/bench/bench_e2e.py --quick             # V = 730 only, fewer repeats (a smoke run)
    python experiments/bench/bench_e2e.py --hf-dir <Qwen2 folder>            # a real checkpoint's weights

The LLM is built the way a checkpoint is: a `transformers` Qwen2ForCausalLM folder (default: random
weights at Qwen2-0.5B's configuration, LLaVA-OneVision-0.5B's LLM, saved to a temporary folder)
imported by `src.models.hf_import.decoder_from_hf`. Every VISOR row shares that decoder's imported
layers (and adds its own cross sublayers); transformers' own Qwen2ForCausalLM (sdpa) on the same
folder is the peer row. Visual tokens enter as random LLM-width embeddings (the vision encoder and
projector are outside this benchmark: the same cost in every row), V = 729 x crops (+1 newline for a
single crop): 730 (one 384 px crop), 2916 (4 crops), 7290 (10 crops); without the pooling / VisionZip
rows any V runs, e.g. AnyRes's own counts (1485 for a 384 px image, 3699 for a 768 px one).

Measured, each phase's rows interleaved within every repeat (medians; spread = (max - min) / median):
  prefill  : B = 1, T text tokens after V visual ones (`--image-at A`: A of them before the image, as a
             chat template puts it inside the first user turn), filling the KV cache, logits at the last token;
  decode   : ms per new token at batch 1, 8, 32 from a cache of the prompt (a batch-1 prefill repeated
             B times, `KVCache.repeat`: a decode step's cost does not depend on the cache's contents);
  train    : one step (forward, backward over the answer tokens' loss, AdamW) at B = 1, embeddings frozen
             (model.freeze_embeddings) unless the row says otherwise;
  memory   : the KV cache bytes of one sample (visual part separately), and the batch whose weights + KV
             cache fit 16 GiB (arithmetic on those bytes); on CUDA also the measured peak per prefill.
FLOPs: analytic (src/flops.py, causal attention counted at half: what the kernels compute), the
training step's measured by FlopCounterMode (forward + backward). Ratios are full's time over the
row's (speed-up) beside full's FLOPs over the row's. Writes experiments/results/bench_e2e_<device>.md.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments.bench.bench_cross_attention import interleaved_times, machine_name, matmul_rate, write_report as write_lines  # noqa: E402
from src.flops import fastv_rank_flops, llm_flops, measured_flops  # noqa: E402
from src.models.decoder import PRESETS, Decoder  # noqa: E402
from src.models.generation import decode_step  # noqa: E402
from src.models.hf_import import decoder_from_hf  # noqa: E402
from src.models.kv_cache import KVCache  # noqa: E402
from src.models.plan import LayerPlan  # noqa: E402
from src.models.token_reduction import AvgPoolReducer, FastVReducer, TokenReducer, VisionZipReducer  # noqa: E402

CROP = 729  # SigLIP-so400m at 384 px, patch 14: a 27 x 27 grid per crop
GIB = 2**30


def visual_counts(v: int) -> int:
    """Crops of a V: 730 -> 1 (with the newline), 729 k -> k."""
    crops, rest = divmod(v, CROP)
    if not (crops >= 1 and (rest == 0 or (crops == 1 and rest == 1))):
        raise SystemExit(f"--visual {v}: use 729 x crops (+1 for a single crop's newline): 730, 2916, 7290")
    return crops


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


def llava_ov_plan() -> dict:
    """configs/llava_ov_0.5b.yaml's plan, read from the config so the row follows it."""
    cfg = yaml.safe_load((ROOT / "configs" / "llava_ov_0.5b.yaml").read_text())
    return dict(cfg["model"]["init_args"]["lvlm"]["init_args"]["plan"])


def row_specs() -> Dict[str, dict]:
    ov = llava_ov_plan()
    lean = dict(ov, self_layers=ov["self_layers"][:1])
    zero = dict(ov, self_layers=[])
    full = dict(n_layers=ov["n_layers"], all_self=True)
    return {
        "full": dict(what="full (every layer self)", plan=full),
        "llava_ov": dict(what=f"VISOR, configs/llava_ov_0.5b.yaml (self {ov['self_layers']}, cross every "
                              f"{ov['cross_every']} from {ov['cross_offset']})", plan=ov),
        "lean": dict(what=f"VISOR, 1 self (self {lean['self_layers']}), same cross", plan=lean),
        "zero_self": dict(what="VISOR, no self layer, same cross", plan=zero),
        "pool2": dict(what="full + 2x2 pooling per crop", plan=full, reducer=AvgPoolReducer(2)),
        "visionzip25": dict(what="full + VisionZip-style 25% per crop", plan=full,
                            reducer=VisionZipReducer(0.25, 0.15)),
        "fastv50": dict(what="full + FastV-style 50% dropped at layer 2", plan=full, fastv=FastVReducer(2, 0.5)),
        "transformers": dict(what="transformers Qwen2ForCausalLM (sdpa), same weights", plan=full, peer=True),
    }


def random_qwen2_folder(where: Path, dtype: torch.dtype) -> Path:
    """A Qwen2ForCausalLM with random weights at Qwen2-0.5B's configuration, saved by transformers."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    p = PRESETS["qwen2-0.5b"]
    cfg = Qwen2Config(vocab_size=p["vocab_size"], hidden_size=p["d_model"], intermediate_size=p["intermediate_size"],
                      num_hidden_layers=p["n_layers"], num_attention_heads=p["n_heads"],
                      num_key_value_heads=p["n_kv_heads"], rope_theta=p["rope_theta"], rms_norm_eps=p["norm_eps"],
                      tie_word_embeddings=True, max_position_embeddings=32768, torch_dtype=str(dtype).split(".")[1])
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(dtype)
    model.save_pretrained(where)
    del model
    return where


def build_rows(folder: Path, names: List[str], device: str, dtype: torch.dtype) -> Dict[str, SimpleNamespace]:
    """Each row's model; VISOR rows share the full decoder's imported layers (memory: one copy)."""
    specs = row_specs()
    full = decoder_from_hf(folder).to(device=device, dtype=dtype).eval()
    rows = {}
    for name in names:
        spec = specs[name]
        if spec.get("peer"):
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=dtype, attn_implementation="sdpa")
            rows[name] = SimpleNamespace(name=name, what=spec["what"], peer=model.to(device).eval(), dec=full,
                                         reducer=None)
            continue
        plan = LayerPlan(**spec["plan"])
        if name == "full":
            dec = full
        else:
            dec = Decoder(full.config, plan, fastv=spec.get("fastv")).to(device=device, dtype=dtype).eval()
            dec.embed_tokens, dec.layers, dec.norm, dec.lm_head = full.embed_tokens, full.layers, full.norm, full.lm_head
            dec.init_cross_from_host()  # as a checkpoint conversion does
        rows[name] = SimpleNamespace(name=name, what=spec["what"], peer=None, dec=dec, reducer=spec.get("reducer"))
    return rows


def reduce_visual(reducer: Optional[TokenReducer], visual: torch.Tensor) -> torch.Tensor:
    """A pre-LLM reducer applied per crop (as per image in LLaVA-OneVision): visual (B, V, d) -> (B, V', d)."""
    if reducer is None:
        return visual
    B, V, d = visual.shape
    crops = V // CROP
    grid = visual[:, : crops * CROP].reshape(B * crops, CROP, d)
    kept, _ = reducer(grid, (27, 27))
    out = kept.reshape(B, -1, d)
    return torch.cat([out, visual[:, crops * CROP:]], dim=1)  # the newline, if any


def row_flops(row, V: int, T: int, image_at: int = 0) -> int:
    """Analytic prefill FLOPs of one sample (the LM head at the last position only), image_at of the T
    text tokens before the image."""
    dec = row.dec
    c, plan = dec.config, dec.plan
    kinds = plan.budget_kinds()
    if row.reducer is not None:
        crops = V // CROP
        V_in = crops * row.reducer.n_tokens(CROP) + (V - crops * CROP)
        return (llm_flops(c, kinds, V_in, T, head_tokens=1, image_at=image_at)
                + crops * row.reducer.reduction_flops(CROP, c.d_model))
    if dec.fastv is not None:
        K = dec.fastv.layer
        per_layer = [V] * K + [dec.fastv.n_kept(V)] * (len(kinds) - K)
        return (llm_flops(c, kinds, per_layer, T, head_tokens=1, image_at=image_at)
                + fastv_rank_flops(c, kinds[K - 1], V, T))
    return llm_flops(c, kinds, V, T, head_tokens=1, image_at=image_at)


# ---------------------------------------------------------------------------------------------
# What is timed
# ---------------------------------------------------------------------------------------------


def prefill(row, visual: torch.Tensor, ids: torch.Tensor, capacity: int, image_at: int = 0):
    """-> (last-token logits (B, vocab), the cache): ours through Decoder.run_layers, the peer through
    transformers (logits_to_keep=1) over the sequence in order (ids[:, :image_at], visual, the rest)."""
    if row.peer is not None:
        text = row.peer.get_input_embeddings()(ids)
        embeds = torch.cat([text[:, :image_at], visual, text[:, image_at:]], dim=1)
        out = row.peer(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], out.past_key_values
    dec = row.dec
    visual = reduce_visual(row.reducer, visual)
    B, V, T = visual.shape[0], visual.shape[1], ids.shape[1]
    text = dec.embed_tokens(ids)
    cache = KVCache(torch.full((B,), V, device=ids.device), torch.full((B,), T, device=ids.device), capacity)
    _, hidden, _ = dec.run_layers(visual, text, 0, dec.config.n_layers, dec.positions(V, T, ids.device, image_at=image_at),
                                  cache=cache, image_at=image_at)
    return dec.lm_head(dec.norm(hidden[:, -1])), cache


def med_spread(ts: List[float]):
    m = statistics.median(ts)
    return m, (max(ts) - min(ts)) / m


def cache_bytes(cache) -> tuple:
    """(visual bytes, text bytes) of a cache of ours; the peer's: all of it as (visual + text) K/V."""
    if isinstance(cache, KVCache):
        return cache.visual_bytes(), cache.text_bytes()
    total = 0
    for layer in cache.layers:
        total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total, 0


def bench_prefill(rows, V: int, T: int, repeats: int, device: str, dtype: torch.dtype, capacity: int,
                  image_at: int = 0):
    c = next(iter(rows.values())).dec.config
    g = torch.Generator(device="cpu").manual_seed(V)
    visual = (torch.randn(1, V, c.d_model, generator=g) * 0.02).to(device=device, dtype=dtype)
    ids = torch.randint(0, c.vocab_size, (1, T), generator=g).to(device)
    last = {}

    def run(name, row):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        logits, cache = prefill(row, visual, ids, capacity, image_at)
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
        last[name] = (logits, cache, peak)

    with torch.no_grad():
        times = interleaved_times({name: (lambda name=name, row=row: run(name, row)) for name, row in rows.items()},
                          device, repeats, f"prefill V={V}")
    out = {}
    for name, row in rows.items():
        logits, cache, peak = last.pop(name)
        vis_b, text_b = cache_bytes(cache)
        out[name] = dict(times=times[name], flops=row_flops(row, V, T, image_at), visual_kv=vis_b, text_kv=text_b,
                         peak=peak, logits=logits.float().cpu())
    return out


def bench_decode(rows, V: int, T: int, batches: List[int], tokens: int, repeats: int, device: str,
                 dtype: torch.dtype, capacity: int, image_at: int = 0):
    c = next(iter(rows.values())).dec.config
    g = torch.Generator(device="cpu").manual_seed(V + 1)
    visual = (torch.randn(1, V, c.d_model, generator=g) * 0.02).to(device=device, dtype=dtype)
    ids = torch.randint(0, c.vocab_size, (1, T), generator=g).to(device)
    results = {}
    with torch.no_grad():
        base = {name: prefill(row, visual, ids, capacity, image_at)[1] for name, row in rows.items()}
        for B in batches:
            caches = {}
            for name, cache in base.items():
                if isinstance(cache, KVCache):
                    caches[name] = cache.repeat(B)
                else:
                    copied = copy.deepcopy(cache)
                    if B > 1:
                        copied.batch_repeat_interleave(B)
                    caches[name] = copied
            tok = torch.randint(0, c.vocab_size, (B,), generator=g).to(device)

            def run(name, row=None):
                row, cache = rows[name], caches[name]
                if row.peer is not None:
                    extra = cache.get_seq_length() - (V + T)
                    if extra > 0:
                        cache.crop(-extra)  # back to the prompt (transformers 5: minus the tokens to drop)
                    x = tok[:, None]
                    for _ in range(tokens):
                        logits = row.peer(input_ids=x, past_key_values=cache, use_cache=True).logits[:, -1]
                        x = logits.argmax(-1, keepdim=True)
                    return
                cache.lengths = torch.full((B,), T, device=device)
                x = tok
                lvlm = SimpleNamespace(decoder=row.dec)
                for _ in range(tokens):
                    x = decode_step(lvlm, cache, x).argmax(-1)

            times = interleaved_times({name: (lambda name=name: run(name)) for name in rows}, device, repeats,
                              f"decode V={V} B={B}")
            for name in rows:
                results[(B, name)] = [t / tokens for t in times[name]]
            del caches
            gc.collect()
    return results


def bench_train(folder: Path, names: List[str], V: int, T: int, answer: int, repeats: int, device: str,
                dtype: torch.dtype):
    """One optimizer step per call; models own their weights (each has its optimizer state)."""
    specs = row_specs()
    hf_config = json.loads((folder / "config.json").read_text())
    d, vocab = hf_config["hidden_size"], hf_config["vocab_size"]
    g = torch.Generator(device="cpu").manual_seed(7)
    visual = (torch.randn(1, V, d, generator=g) * 0.02).to(device=device, dtype=dtype)
    ids = torch.randint(0, vocab, (1, T), generator=g).to(device)
    mask = torch.zeros(1, T, dtype=torch.bool, device=device)
    mask[:, -answer:] = True
    targets = torch.randint(0, vocab, (answer,), generator=g).to(device)
    steps, flops = {}, {}
    shared = None
    for name in names:
        frozen = not name.endswith("+emb")
        spec = specs[name.removesuffix("+emb")]
        dec = decoder_from_hf(folder, LayerPlan(**spec["plan"])).to(device=device, dtype=dtype).train()
        if shared is None:
            shared = dec
        else:  # one copy of the base weights: the timing of a step does not depend on whose they are
            dec.embed_tokens, dec.layers, dec.norm, dec.lm_head = shared.embed_tokens, shared.layers, shared.norm, shared.lm_head
        params = [p for n, p in dec.named_parameters() if not (frozen and n.startswith(("embed_tokens.", "lm_head.")))]
        opt = torch.optim.AdamW(params, lr=1e-6, fused=True)  # as src/lit/visor_module.py: one pass, not a loop of kernels

        def loss_fn(dec=dec, frozen=frozen):
            dec.embed_tokens.weight.requires_grad_(not frozen)
            text = dec.embed_tokens(ids)
            hidden, _ = dec(visual, text)
            return F.cross_entropy(dec.lm_head(hidden[mask]).float(), targets)

        def step(loss_fn=loss_fn, opt=opt):
            loss_fn().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[name] = step
        flops[name] = measured_flops(lambda loss_fn=loss_fn: loss_fn().backward())
        opt.zero_grad(set_to_none=True)
    times = interleaved_times(steps, device, repeats, f"train V={V}")
    return {name: dict(times=times[name], flops=flops[name]) for name in names}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def write_report(path: Path, meta: dict, prefill_res, decode_res, train_res, rows_what, budget_gib: float) -> None:
    L = ["# End-to-end LLM benchmark (" + meta["device"] + ")", "",
         f"Machine: {meta['machine']}. torch {torch.__version__}, transformers {meta['transformers']}, "
         f"{meta['dtype']}. Measured {meta['dtype']} matmul rate: {meta['rate'] / 1e9:.0f} GFLOP/s. "
         f"Command: `{meta['command']}`.",
         f"Model: {meta['model']}, imported through src/models/hf_import.py. T = {meta['T']} text tokens, "
         f"{meta.get('image_at', 0)} of them before the image; "
         "visual tokens random at LLM width (the vision encoder is not timed). Medians of "
         f"{meta['repeats']} interleaved repeats; spread = (max - min) / median. Speed-up = full's time / the "
         "row's; FLOPs ratio = full's FLOPs / the row's (causal attention counted at half, src/flops.py); "
         "efficiency = speed-up / FLOPs ratio.", ""]
    L += ["## Rows", ""] + [f"- `{n}`: {w}" for n, w in rows_what.items()] + [""]
    L += ["## Prefill (B = 1, to the first token's logits)", "",
          "| V | row | ms | spread | GFLOPs | GFLOP/s | speed-up | FLOPs ratio | efficiency | visual KV MiB | "
          "max batch in %g GiB | logits vs full (max abs diff) |" % budget_gib,
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for V, res in prefill_res.items():
        full_t = statistics.median(res["full"]["times"])
        full_f = res["full"]["flops"]
        for name, r in res.items():
            t, spread = med_spread(r["times"])
            per_sample = r["visual_kv"] + r["text_kv"]
            fit = int((budget_gib * GIB - meta["weight_bytes"]) // per_sample) if per_sample else 0
            diff = f'{(r["logits"] - res["full"]["logits"]).abs().max().item():.1e}' if name == "transformers" else "-"
            L.append(f"| {V} | {name} | {t * 1e3:.0f} | {spread:.0%} | {r['flops'] / 1e9:.1f} | "
                     f"{r['flops'] / t / 1e9:.0f} | {full_t / t:.2f}x | {full_f / r['flops']:.2f}x | "
                     f"{full_t / t / (full_f / r['flops']):.2f} | {r['visual_kv'] / 2**20:.1f} | {fit} | "
                     f"{diff} |")
    L += ["", "Visual KV: the cache's visual K/V of one sample (self layers' visual slots, cross sublayers' K/V; "
          "the transformers row: its whole cache). Max batch: (budget - weights) / one sample's KV cache "
          f"(visual + {meta['capacity']} text slots), arithmetic on the measured cache tensors."
          + (" Peak memory per prefill (CUDA, measured): see the JSON beside this file." if meta["device"] == "cuda" else ""),
          ""]
    if decode_res:
        L += ["## Decode (ms per new token, one token per sample per step)", "",
              "| V | B | row | ms / token | spread | speed-up vs full | tokens/s |", "|---|---|---|---|---|---|---|"]
        for V, res in decode_res.items():
            for (B, name), ts in res.items():
                t, spread = med_spread(ts)
                full_t = statistics.median(res[(B, "full")])
                L.append(f"| {V} | {B} | {name} | {t * 1e3:.1f} | {spread:.0%} | {full_t / t:.2f}x | {B / t:.1f} |")
        L.append("")
    if train_res:
        L += ["## Training step (B = 1, forward + backward + AdamW)", "",
              "| V | row | s / step | spread | GFLOPs (fwd+bwd, measured) | speed-up | FLOPs ratio | efficiency |",
              "|---|---|---|---|---|---|---|---|"]
        for V, res in train_res.items():
            full_t, full_f = statistics.median(res["full"]["times"]), res["full"]["flops"]
            for name, r in res.items():
                t, spread = med_spread(r["times"])
                L.append(f"| {V} | {name} | {t:.2f} | {spread:.0%} | {r['flops'] / 1e9:.0f} | {full_t / t:.2f}x | "
                         f"{full_f / r['flops']:.2f}x | {full_t / t / (full_f / r['flops']):.2f} |")
        L += ["", "Rows train every LLM parameter but the token embedding and the tied LM head "
              "(model.freeze_embeddings: true); `+emb` rows train those too.", ""]
    write_lines(path, L)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--hf-dir", default=None, help="a Qwen2ForCausalLM folder (default: random Qwen2-0.5B weights)")
    ap.add_argument("--visual", default="730,2916,7290", help="visual token counts, comma separated")
    ap.add_argument("--text", type=int, default=64, help="text tokens of the prompt")
    ap.add_argument("--image-at", type=int, default=0,
                    help="text tokens before the image (LLaVA-OV's chat layout: 3, `<|im_start|>user\\n`)")
    ap.add_argument("--rows", default=",".join(row_specs()), help="rows, comma separated (full is always run)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--decode-batches", default="1,8,32")
    ap.add_argument("--decode-tokens", type=int, default=4, help="new tokens per timed decode call")
    ap.add_argument("--decode-max-visual", type=int, default=2916,
                    help="decode only at V up to this (the full model's batch-32 cache at 7290 is 5.8 GB in fp32)")
    ap.add_argument("--train-visual", default="730", help="V for the training step (empty: skip)")
    ap.add_argument("--train-rows", default="full,llava_ov,lean,llava_ov+emb")
    ap.add_argument("--memory-budget-gib", type=float, default=16.0)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="V = 730, 3 repeats, decode batches 1 and 8")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but no GPU is visible")
    if not 0 <= args.image_at < args.text:
        sys.exit(f"--image-at {args.image_at}: must be in [0, --text={args.text})")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.visual, args.repeats, args.decode_batches = "730", min(args.repeats, 3), "1,8"
    dtype = getattr(torch, args.dtype)
    names = ["full"] + [n for n in args.rows.split(",") if n and n != "full"]
    unknown = set(names) - set(row_specs())
    if unknown:
        sys.exit(f"--rows: unknown {sorted(unknown)}; known: {sorted(row_specs())}")
    import transformers
    machine = machine_name(args.device)
    rate = matmul_rate(args.device, dtype)
    print(f"{machine}: {args.dtype} matmul {rate / 1e9:.0f} GFLOP/s; torch {torch.__version__}", flush=True)
    capacity = args.text + 64
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.hf_dir) if args.hf_dir else random_qwen2_folder(Path(tmp) / "qwen2-0.5b-random", dtype)
        model_name = args.hf_dir or "random Qwen2-0.5B weights (transformers Qwen2ForCausalLM, saved and re-imported)"
        rows = build_rows(folder, names, args.device, dtype)
        weight_bytes = sum(p.numel() * p.element_size() for p in rows["full"].dec.parameters())
        prefill_res, decode_res, train_res = {}, {}, {}
        per_crop = any("reducer" in row_specs()[n] for n in names)  # pooling / VisionZip work per 729-token crop
        for V in [int(v) for v in args.visual.split(",") if v]:
            if per_crop:
                visual_counts(V)
            elif V < 1:
                sys.exit(f"--visual {V}: must be positive")
            reps = args.repeats if V < 7290 else max(3, args.repeats // 2)
            prefill_res[V] = bench_prefill(rows, V, args.text, reps, args.device, dtype, capacity, args.image_at)
            if V <= args.decode_max_visual:
                batches = [int(b) for b in args.decode_batches.split(",")]
                decode_res[V] = bench_decode(rows, V, args.text, batches, args.decode_tokens, max(3, reps // 2),
                                             args.device, dtype, capacity, args.image_at)
        del rows
        gc.collect()
        for V in [int(v) for v in args.train_visual.split(",") if v]:
            train_res[V] = bench_train(folder, args.train_rows.split(","), V, args.text, min(16, args.text), args.repeats,
                                       args.device, dtype)
    meta = dict(device=args.device, machine=machine, dtype=args.dtype, rate=rate, T=args.text, image_at=args.image_at,
                repeats=args.repeats,
                model=model_name, transformers=transformers.__version__, weight_bytes=weight_bytes, capacity=capacity,
                command="python experiments/bench/bench_e2e.py " + " ".join(sys.argv[1:]))
    out = Path(args.out) if args.out else ROOT / "experiments" / "results" / f"bench_e2e_{args.device}.md"
    write_report(out, meta, prefill_res, decode_res, train_res, {n: row_specs()[n]["what"] for n in names},
                 args.memory_budget_gib)
    raw = {str(V): {n: {k: v for k, v in r.items() if k != "logits"} for n, r in res.items()}
           for V, res in prefill_res.items()}
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, prefill=raw,
                                                        decode={str(V): {f"{B}/{n}": ts for (B, n), ts in res.items()}
                                                                for V, res in decode_res.items()},
                                                        train={str(V): res for V, res in train_res.items()}), indent=1))


if __name__ == "__main__":
    main()
