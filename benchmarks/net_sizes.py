"""Every network config at its resolution: parameters, forward GFLOPs per image, CPU
training images/s and peak memory, with and without activation checkpointing, and the
step time on one H100 computed from the FLOPs.

    python benchmarks/net_sizes.py [--models tiny small unet64] [--batch 8] [--steps 2]

Each measurement runs in a fresh process (its peak RSS is its own): the net, AdamW and
``--steps`` timed training steps (after one untimed) of the EDM loss at ``--batch``
(``--big-batch`` for unet128 and unet256, whose steps take minutes on a CPU). Memory per
image is the peak over the same process's peak at batch 1, divided by the extra images.
Writes ``--out``/results.json and table.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"tiny": (8, 1), "small": (32, 3), "base": (32, 3), "ddpm_cifar10": (32, 3),
         "unet64": (64, 3), "unet128": (128, 3), "unet256": (256, 3)}  # fmt: skip
H100_BF16 = 989e12 * 0.3  # dense bf16 peak x 30% utilisation: a computed figure

STEP = r"""
import json, resource, sys, time, torch
sys.path.insert(0, sys.argv[1])
from hydra.utils import instantiate
from tests.conftest import compose_train
from ddpm.diffusion.objectives import EDMLoss
from ddpm.diffusion.preconditioning import EDMPrecond
name, (size, ch, batch, steps), ckpt = sys.argv[2], map(int, sys.argv[3:7]), sys.argv[7] == "1"
cfg = compose_train([f"model={name}", "data=folder", "data.root=x", f"data.image_size={size}",
                     f"data.channels={ch}", f"model.checkpointing={str(ckpt).lower()}"])
torch.manual_seed(0)
net = instantiate(cfg.model)
opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
loss_fn = EDMLoss(EDMPrecond())
x = torch.rand(batch, ch, size, size) * 2 - 1
def step():
    loss = loss_fn(net, None, x).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
step()
start = time.perf_counter()
for _ in range(steps):
    step()
seconds = (time.perf_counter() - start) / steps
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds_per_step": seconds, "images_per_s": batch / seconds,
                  "peak_rss_mb": peak}))
"""


def measure(name: str, batch: int, steps: int, checkpointing: bool) -> dict:
    size, ch = SIZES[name]
    args = [str(ROOT), name, str(size), str(ch), str(batch), str(steps), str(int(checkpointing))]
    result = subprocess.run([sys.executable, "-c", STEP, *args], capture_output=True, text=True)
    if result.returncode != 0:  # killed for memory, or an allocation failure
        return {"failed": result.stderr.strip().splitlines()[-1][:200] if result.stderr else
                f"exit {result.returncode}"}  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


def static(name: str) -> dict:
    """Parameters and forward GFLOPs per image, on the meta device (nothing allocated)."""
    import torch
    from hydra.utils import instantiate
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT))
    from tests.conftest import compose_train

    size, ch = SIZES[name]
    cfg = compose_train([f"model={name}", "data=folder", "data.root=x",
                         f"data.image_size={size}", f"data.channels={ch}"])  # fmt: skip
    with torch.device("meta"):
        net = instantiate(cfg.model)
        with FlopCounterMode(display=False) as flops:
            net(torch.randn(1, ch, size, size), torch.tensor([1.0]))
    params = sum(p.numel() for p in net.parameters())
    return {"size": size, "parameters": params, "gflops_forward": flops.get_total_flops() / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SIZES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--big-batch", type=int, default=2, help="batch of unet128/unet256")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/net_sizes")
    parser.add_argument("--table-only", action="store_true", help="rewrite table.md only")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for name in [] if args.table_only else args.models:
        row = static(name)
        batch = args.big_batch if name in ("unet128", "unet256") else args.batch
        steps = 1 if name in ("unet128", "unet256") else args.steps
        row["batch"] = batch
        for checkpointing in (False, True):
            key = "checkpointing" if checkpointing else "plain"
            row[key] = measure(name, batch, steps, checkpointing)
            one = measure(name, 1, 1, checkpointing)
            if "peak_rss_mb" in row[key] and "peak_rss_mb" in one and batch > 1:
                row[key]["mb_per_image"] = (row[key]["peak_rss_mb"] - one["peak_rss_mb"]) / (
                    batch - 1
                )
        row["h100_ms_per_image_computed"] = 3 * row["gflops_forward"] * 1e9 / H100_BF16 * 1e3
        results[name] = row
        path.write_text(json.dumps(results, indent=1))
        print(name, json.dumps(row), flush=True)
    head = ["net", "px", "parameters", "GFLOPs / image (fwd)", "batch", "CPU img/s",
            "peak MB", "MB / image", "with checkpointing: img/s", "peak MB", "MB / image",
            "H100 ms / image (computed)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]

    def cells(m: dict) -> list[str]:
        if "failed" in m:
            return ["out of memory", "-", "-"]
        per = m.get("mb_per_image")
        return [f"{m['images_per_s']:.2f}", f"{m['peak_rss_mb']:,.0f}",
                f"{per:,.0f}" if per is not None else "-"]  # fmt: skip

    for name, r in results.items():
        row = [name, str(r["size"]), f"{r['parameters'] / 1e6:.2f}M",
               f"{r['gflops_forward']:.2f}", str(r["batch"]), *cells(r["plain"]),
               *cells(r["checkpointing"]), f"{r['h100_ms_per_image_computed']:.3g}"]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
