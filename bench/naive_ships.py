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
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # peer_ships, for the same head selection
from peer_ships import pick_heads  # noqa: E402
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

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, result.kl.numpy().astype(np.float64))
    meta = {
        "heads": [f"L{layer}H{head}" for layer, head in heads],
        "n_prompts": len(token_ids),
        "eps": args.eps,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "import_s": T_IMPORTED - T_START,
        "load_s": t_loaded - T_IMPORTED,
        "warmup_s": t_warm - t_loaded,
        "scan_s": t_scanned - t_warm,
        "forwards": len(token_ids) * (1 + len(heads)),
        "wall_s": time.perf_counter() - T_START,
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    print(f"naive: {len(heads)} heads x {len(token_ids)} prompts in {meta['wall_s']:.1f} s "
          f"(imports {meta['import_s']:.1f} s, load {meta['load_s']:.1f} s, scan {meta['scan_s']:.1f} s, "
          f"{meta['forwards']} forwards)")


if __name__ == "__main__":
    main()
