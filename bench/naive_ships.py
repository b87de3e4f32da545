"""The naive Ships strategy as a whole process, for `bench/bench_whole.py`: the authors' way, one full forward
per head per prompt, batch 1, LM head at every position (`study.engine.naive_scan`, the project's reference).

Same input and output as `bench/peer_ships.py`: a JSON file {"token_ids": [[...], ...]} of formatted prompts,
the model folder, and `OUT.npy` (heads x prompts KL, layer-major) with `OUT.json` (head labels, timings).
`--heads K` scans K heads spread over the model (the benchmark extrapolates the scan time to all heads).

    python bench/naive_ships.py --model MODEL_FOLDER --inputs inputs.json --out naive.npy [--heads K]
"""

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # peer_ships, for the same head selection
from peer_ships import pick_heads, write_result  # noqa: E402
from study.ablation import Ablation, Op  # noqa: E402
from study.engine import naive_scan  # noqa: E402
from study.heads import Head  # noqa: E402
from study.models import load_model  # noqa: E402

T_IMPORTED = time.perf_counter()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="alias, model folder or hub id")
    ap.add_argument("--inputs", required=True, help="JSON with token_ids")
    ap.add_argument("--out", required=True, help="(heads x prompts) KL matrix (.npy)")
    ap.add_argument("--eps", type=float, default=1e-5)
    ap.add_argument("--heads", default="all", help="all (default), a count K spread over the model, or labels")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--warmup", action="store_true",
                    help="one forward (the first prompt) before the scan, timed apart (when scan_s is extrapolated)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    token_ids = [list(map(int, t)) for t in json.loads(Path(args.inputs).read_text(encoding="utf-8"))["token_ids"]]
    lm = load_model(args.model, device="cpu", dtype="float32")
    t_loaded = time.perf_counter()
    cfg = lm.model.config
    heads = pick_heads(args.heads, cfg.num_hidden_layers, cfg.num_attention_heads)
    ablations = [Ablation(heads=(Head(layer, head),), op=Op.UNDIFF_Q, eps=args.eps) for layer, head in heads]
    if args.warmup:
        lm.model(input_ids=torch.as_tensor([token_ids[0]]), use_cache=False)
    t_warm = time.perf_counter()
    result = naive_scan(lm.model, token_ids, ablations)
    t_scanned = time.perf_counter()

    write_result("naive", Path(args.out), result.kl.numpy(), heads, len(token_ids), args.eps,
                 len(token_ids) * (1 + len(heads)), (T_START, T_IMPORTED, t_loaded, t_warm, t_scanned))


if __name__ == "__main__":
    main()
