"""InceptionV3 (FID's pool3 extractor) on this CPU: fp32 vs bf16, side by side in one process.

Times the TorchScript network (task/image/fid.py) at 299x299 on the same images, interleaved
batch by batch (fp32, bf16 autocast, bf16 weights) so a shared machine's load falls on every
variant alike, and says how much the bf16 features move FID and KID (task/image/scores.py)
from the fp32 ones on the same images: real test images A vs B (two disjoint real sets, the
smallest distance) and A vs C (B blurred and at lower contrast, a clear shift). This is how
task/image/fid.py's numbers were measured:

    nice -n 19 python scripts/inception_cost.py --images 48 --variants fp32,bf16-autocast
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from task.image import fid as inception  # noqa: E402
from task.image.data import balanced_order, load_fashion_mnist  # noqa: E402
from task.image.scores import fid, kid  # noqa: E402


def inputs(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 1, 32, 32) -> the network's input, as InceptionFeatures prepares it."""
    x = F.interpolate(images.float().expand(-1, 3, -1, -1), size=(inception.INPUT_SIZE,) * 2,
                      mode="bilinear", align_corners=False)
    return (x - 128.0) / 128.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="images per set (3 sets)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (image.torch-threads)")
    parser.add_argument("--variants", default="fp32,bf16-autocast,bf16-weights")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_fashion_mnist()
    order = balanced_order(data.test_labels, seed=0)
    n = args.images
    a = torch.from_numpy(data.test_images[order[:n]])
    b = torch.from_numpy(data.test_images[order[n:2 * n]])
    blurred = F.interpolate(F.avg_pool2d(b.float(), 2), scale_factor=2, mode="nearest")
    c = (blurred / 2 + 64).round().to(torch.uint8)  # blurred, lower contrast
    images = torch.cat([a, b, c])

    net = inception._network()
    net_bf16 = None
    if "bf16-weights" in args.variants:
        net_bf16 = torch.jit.load(str(inception.inception_weights_file()), map_location="cpu").eval()
        net_bf16 = net_bf16.to(torch.bfloat16)
    variants = {
        "fp32": lambda x: net(x),
        "bf16-autocast": lambda x: _autocast(net, x),
        "bf16-weights": lambda x: net_bf16(x.bfloat16()),
    }
    variants = {k: variants[k] for k in args.variants.split(",")}
    seconds = {k: 0.0 for k in variants}
    features = {k: [] for k in variants}
    with torch.no_grad():
        for f in variants.values():  # warm-up (TorchScript profiling runs)
            f(inputs(images[:2]))
        for batch in images.split(args.batch):
            x = inputs(batch)
            for name, f in variants.items():
                t = time.perf_counter()
                features[name].append(f(x).flatten(1).float())
                seconds[name] += time.perf_counter() - t
    out = {"images": len(images), "threads": args.threads, "batch": args.batch,
           "s_per_image": {k: v / len(images) for k, v in seconds.items()}}
    out["speedup_vs_fp32"] = {k: seconds["fp32"] / v for k, v in seconds.items()}
    feats = {k: torch.cat(v) for k, v in features.items()}
    ref = feats["fp32"]
    m = max(2, n // 2)
    for name, x in feats.items():
        fa, fb, fc = x[:n], x[n:2 * n], x[2 * n:]
        (kid_ab, std_ab), (kid_ac, std_ac) = kid(fa, fb, 100, m, seed=0), kid(fa, fc, 100, m, seed=0)
        out[name] = {"feature_rel_l2_error": float((x - ref).norm() / ref.norm()),
                     "fid_a_b": fid(fa, fb), "fid_a_c": fid(fa, fc), "kid_a_b": kid_ab,
                     "kid_a_b_std": std_ab, "kid_a_c": kid_ac, "kid_a_c_std": std_ac}
    for name in set(variants) - {"fp32"}:
        out[name]["change_pct_vs_fp32"] = {k: 100 * (out[name][k] / out["fp32"][k] - 1)
                                           for k in ("fid_a_b", "fid_a_c", "kid_a_b", "kid_a_c")}
    print(json.dumps(out, indent=2))


def _autocast(net, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return net(x)


if __name__ == "__main__":
    main()
