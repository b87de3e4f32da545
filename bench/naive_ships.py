"""The naive Ships strategy as a whole process, for `bench/bench_whole.py`: the authors' way, one full forward
per head per prompt, batch 1, LM head at every position (`study.core.engine.naive_scan`, the project's reference).

Same input and output as `bench/peer_ships.py`: a JSON file {"token_ids": [[...], ...]} of formatted prompts,
the model folder, and `OUT.npy` (heads x prompts KL, layer-major) with `OUT.json` (head labels, timings).
`--heads K` scans K heads spread over the model (the benchmark extrapolates the scan time to all heads).

    python bench/naive_ships.py --model MODEL_FOLDER --inputs inputs.json --out naive.npy [--heads K]
"""

import time

T_START = time.perf_counter()

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # peer_ships: the same command line, heads and output
from peer_ships import pick_heads, script_args, write_result  # noqa: E402

from study.core.ablation import Ablation, Op  # noqa: E402
from study.core.engine import naive_scan  # noqa: E402
from study.core.heads import Head  # noqa: E402
from study.models.loading import load_model  # noqa: E402

T_IMPORTED = time.perf_counter()


def main() -> None:
    args = script_args(__doc__.split("\n\n")[0], "alias, model folder or hub id", "JSON with token_ids")

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
