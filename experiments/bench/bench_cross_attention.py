"""Benchmark: visor::cross_attention against SDPA, and gated layer skipping.

Everything is measured side by side in one run (the machines are shared and noisy): for each shape,
our op and `F.scaled_dot_product_attention(q, k, v, enable_gqa=True)` are timed interleaved on
the same inputs, forward and forward+backward, and the ratio SDPA time / our time is printed
(> 1: ours is faster). The machine's own fp32 matmul rate is measured in the same run, and each
timing is also given as a fraction of it (GPU: of the roofline min(peak, intensity x bandwidth)).

    python experiments/bench/bench_cross_attention.py                 # CPU, the issue's full grid
    python experiments/bench/bench_cross_attention.py --quick         # CPU, the target shapes only
    python experiments/bench/bench_cross_attention.py --device cuda   # GPU

Shapes: Qwen2-0.5B's attention (H=14, Hkv=2, hd=64). Writes a Markdown table to
experiments/results/bench_cross_attention_<device>.md naming the machine.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from src.models.decoder import DecoderConfig, DecoderLayer  # noqa: E402
from src.models.rope import rope_cos_sin  # noqa: E402
from src.ops.extension import extension_available  # noqa: E402
from src.ops.layer_skip import gather_rows, scatter_add_rows  # noqa: E402

H, HKV, HD = 14, 2, 64


def machine_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: Dict[str, Callable[[], object]], device: str, repeats: int) -> Dict[str, float]:
    """Median seconds per call of each function, the functions alternating within every repeat."""
    return {name: statistics.median(ts) for name, ts in interleaved_times(fns, device, repeats).items()}


def interleaved_times(fns: Dict[str, Callable[[], object]], device: str, repeats: int,
                      label: Optional[str] = None) -> Dict[str, List[float]]:
    """Seconds of every call of each function (one warm-up call each first), the functions alternating
    within every repeat; `label`: print the running medians after each repeat."""
    for fn in fns.values():  # warm-up
        fn()
    sync(device)
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
        if label:
            print(f"  {label} repeat {r + 1}/{repeats}: " + ", ".join(
                f"{n} {statistics.median(t) * 1e3:.0f}" for n, t in times.items()) + " ms", flush=True)
    return times


def matmul_rate(device: str, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of a square matmul on this machine, now."""
    n = 2048 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_interleaved({"mm": lambda: a @ b}, device, 5)["mm"]
    return 2 * n**3 / t


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large device-to-device copy (read + write)."""
    x = torch.empty(256 * 2**20 // 4, device=device)
    y = torch.empty_like(x)
    t = time_interleaved({"copy": lambda: y.copy_(x)}, device, 10)["copy"]
    return 2 * x.numel() * 4 / t


def attention_cases(device: str, dtype: torch.dtype, quick: bool, repeats: int, peak: float, bandwidth: float):
    batches, queries, keys = (1, 4), (1, 64, 256), (729, 2916, 7290)
    rows = []
    for B in batches:
        for T in queries:
            for V in keys:
                if quick and (V != 2916 or T == 256):
                    continue
                g = torch.Generator(device=device).manual_seed(B * 1000 + T + V)
                q = torch.randn(B, H, T, HD, device=device, dtype=dtype, generator=g)
                k = torch.randn(B, HKV, V, HD, device=device, dtype=dtype, generator=g)
                v = torch.randn(B, HKV, V, HD, device=device, dtype=dtype, generator=g)
                flops = 4 * B * H * T * V * HD
                io_bytes = (q.numel() * 2 + k.numel() + v.numel()) * q.element_size()
                roof = min(peak, flops / io_bytes * bandwidth) if bandwidth else peak
                scale = HD ** -0.5

                def ours():
                    return torch.ops.visor.cross_attention(q, k, v, None, scale)[0]

                def sdpa():
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

                with torch.no_grad():
                    fwd = time_interleaved({"ours": ours, "sdpa": sdpa}, device, repeats)
                leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
                grad = torch.randn_like(q)

                def ours_fb():
                    torch.ops.visor.cross_attention(*leaves, None, scale)[0].backward(grad)

                def sdpa_fb():
                    F.scaled_dot_product_attention(*leaves, enable_gqa=True).backward(grad)

                fb = time_interleaved({"ours": ours_fb, "sdpa": sdpa_fb}, device, max(2, repeats // 2))
                row = dict(B=B, T=T, V=V, fwd_ms=fwd["ours"] * 1e3, sdpa_fwd_ms=fwd["sdpa"] * 1e3,
                           fwd_speedup=fwd["sdpa"] / fwd["ours"], fwd_frac=flops / fwd["ours"] / roof,
                           fb_ms=fb["ours"] * 1e3, sdpa_fb_ms=fb["sdpa"] * 1e3, fb_speedup=fb["sdpa"] / fb["ours"],
                           fb_frac=3.5 * flops / fb["ours"] / peak)
                rows.append(row)
                print(f"B={B} T={T:>3} V={V:>4}  fwd {row['fwd_ms']:8.2f} ms  x{row['fwd_speedup']:.2f} vs SDPA "
                      f"({row['fwd_frac']:.0%} of {'roofline' if bandwidth else 'matmul rate'})   fwd+bwd "
                      f"{row['fb_ms']:8.2f} ms  x{row['fb_speedup']:.2f}", flush=True)
    return rows


def layer_skip_cases(device: str, dtype: torch.dtype, repeats: int):
    """A self layer over a batch of 16 with a fraction p active (gather -> layer -> scatter with residual),
    against the all-active layer."""
    c = DecoderConfig(preset="tiny", d_model=256, n_heads=4, n_kv_heads=2, intermediate_size=704)
    layer = DecoderLayer(c).to(device=device, dtype=dtype).eval()
    batch, seq = 16, 320
    x = torch.randn(batch, seq, c.d_model, device=device, dtype=dtype)
    cos, sin = rope_cos_sin(torch.arange(seq, device=device), c.head_dim, c.rope_theta, dtype)
    flat = x.reshape(batch, -1)

    def gated(active: torch.Tensor):
        if active.numel() == 0:
            return x
        xa = gather_rows(flat, active).view(len(active), seq, c.d_model)
        delta = layer(xa, cos, sin) - xa
        return scatter_add_rows(flat, active, delta.reshape(len(active), -1)).view_as(x)

    rows = []
    with torch.no_grad():
        for n_active in (0, 4, 8, 12, 16):
            active = torch.arange(n_active, device=device) * (batch // max(1, n_active)) if n_active else \
                torch.zeros(0, dtype=torch.long, device=device)
            t = time_interleaved({"all": lambda: layer(x, cos, sin), "gated": lambda: gated(active)}, device, repeats)
            p = n_active / batch
            rows.append(dict(p=p, ratio=t["gated"] / t["all"], target=p + 0.1))
            print(f"layer skip: p={p:.2f} active  cost {t['gated'] / t['all']:.3f} of all-active  "
                  f"(target <= {p + 0.1:.2f})", flush=True)
    return rows


def write_table(path: Path, device: str, machine: str, rate: float, bandwidth: float, att, skip) -> None:
    lines = [f"# visor::cross_attention vs SDPA ({device})", "",
             f"Machine: {machine}. torch {torch.__version__}. Measured fp32 matmul rate: {rate / 1e9:.0f} GFLOP/s"
             + (f", copy bandwidth {bandwidth / 1e9:.0f} GB/s." if bandwidth else "."),
             "Speed-up = SDPA time / our time, both timed interleaved in this one run (> 1: ours faster). "
             f"Shapes: H={H}, Hkv={HKV}, hd={HD} (Qwen2-0.5B). Fraction: of the "
             + ("roofline min(peak, intensity x bandwidth)." if bandwidth else "measured matmul rate."), "",
             "| B | T | V | fwd ms | SDPA fwd ms | fwd speed-up | fwd fraction | fwd+bwd ms | SDPA fwd+bwd ms | fwd+bwd speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in att:
        lines.append(f"| {r['B']} | {r['T']} | {r['V']} | {r['fwd_ms']:.2f} | {r['sdpa_fwd_ms']:.2f} | "
                     f"{r['fwd_speedup']:.2f} | {r['fwd_frac']:.0%} | {r['fb_ms']:.2f} | {r['sdpa_fb_ms']:.2f} | "
                     f"{r['fb_speedup']:.2f} |")
    lines += ["", "Gated layer skipping (self layer d=256, 320 tokens, batch 16; cost relative to all 16 active):", "",
              "| active fraction p | cost / all-active | target p + 0.1 |", "|---|---|---|"]
    lines += [f"| {r['p']:.2f} | {r['ratio']:.3f} | {r['target']:.2f} |" for r in skip]
    write_report(path, lines)


def write_report(path: Path, lines: List[str]) -> None:
    """A benchmark's markdown lines to `path` (folders made), and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--quick", action="store_true", help="only V=2916 and T in {1, 64}")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None, help="Markdown output (default experiments/results/...)")
    args = ap.parse_args()
    if not extension_available():
        sys.exit("the C++ extension is not built: `make build` (or pip install --no-build-isolation -e .)")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but no GPU is visible")
    dtype = getattr(torch, args.dtype)
    machine = machine_name(args.device)
    rate = matmul_rate(args.device, torch.float32)
    peak = rate if args.device == "cpu" else matmul_rate(args.device, dtype)
    bandwidth = copy_bandwidth(args.device) if args.device == "cuda" else 0.0
    print(f"{machine}: fp32 matmul {rate / 1e9:.0f} GFLOP/s" + (f", copy {bandwidth / 1e9:.0f} GB/s" if bandwidth else ""))
    att = attention_cases(args.device, dtype, args.quick, args.repeats, peak, bandwidth)
    skip = layer_skip_cases(args.device, dtype, args.repeats)
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"bench_cross_attention_{args.device}.md"
    write_table(out, args.device, machine, rate, bandwidth, att, skip)


if __name__ == "__main__":
    main()
