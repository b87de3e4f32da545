"""A Ships scan the way a competent researcher writes it with plain transformers + torch (no `study`).

Ships of head h on prompt p = KL(normal || ablated_h) of the next-token distribution at the last prompt
position, with `undiff_q`: the head's queries scaled by eps (attention becomes uniform). This script is the
fair peer `bench/bench_whole.py` times against `headstudy ships`:

- the model loaded once (`AutoModelForCausalLM.from_pretrained(folder, dtype=float32)`, eval, no_grad);
- every prompt in ONE left-padded batch (attention mask, position ids counted over real tokens only);
- one normal forward for the reference log-probs, then one forward per head over the whole batch, with the
  head's rows of q_proj's weight (and bias, if any) scaled by eps in place and copied back exactly afterwards;
- only the last position's logits (`logits_to_keep=1`), no hooks; KL in float64.

Input: a JSON file holding either {"token_ids": [[int, ...], ...], "pad_token_id": int} (already formatted and
tokenized prompts: what the benchmark passes, so every strategy sees identical inputs) or {"texts": [str, ...]}
(already formatted prompt strings, tokenized here with the model's tokenizer). Output: `OUT.npy`, the
(heads x prompts) float64 KL matrix, heads in layer-major order, and `OUT.json` beside it (head labels,
timings, threads).

    python bench/peer_ships.py --model MODEL_FOLDER --inputs inputs.json --out kl.npy
    python bench/peer_ships.py --model MODEL_FOLDER --inputs inputs.json --out kl.npy --heads 6 --threads 1
"""

import time

T_START = time.perf_counter()  # before the heavy imports: they are part of what a user waits for

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

T_IMPORTED = time.perf_counter()


def pick_heads(spec: str, n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """`all`, a count K (evenly spread over the model, layer-major order) or labels `L18H8,L7H2`."""
    every = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    spec = spec.strip()
    if spec == "all":
        return every
    if spec.isdigit():
        k = max(1, min(int(spec), len(every)))
        picks = sorted({round(i * (len(every) - 1) / max(1, k - 1)) for i in range(k)}) if k > 1 else [0]
        return [every[i] for i in picks]
    heads = []
    for part in filter(None, re.split(r"[,\s]+", spec)):
        m = re.fullmatch(r"L(\d+)H(\d+)", part)
        if not m or int(m.group(1)) >= n_layers or int(m.group(2)) >= n_heads:
            raise SystemExit(f"bad head {part!r}: expected L<layer>H<head> within {n_layers} layers x {n_heads} heads")
        heads.append((int(m.group(1)), int(m.group(2))))
    return sorted(set(heads))


def left_padded_batch(token_ids: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(t) for t in token_ids)
    ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for i, t in enumerate(token_ids):
        ids[i, width - len(t):] = torch.tensor(t, dtype=torch.long)
        mask[i, width - len(t):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # real tokens at 0..len-1 whatever the padding
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


def script_args(description: str, model_help: str, inputs_help: str) -> argparse.Namespace:
    """The command line bench_whole.py gives both scan scripts (this peer and naive_ships.py); sets the
    threads and turns gradients off."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", required=True, help=model_help)
    ap.add_argument("--inputs", required=True, help=inputs_help)
    ap.add_argument("--out", required=True, help="where to write the (heads x prompts) KL matrix (.npy)")
    ap.add_argument("--eps", type=float, default=1e-5, help="query scale of the ablated head (default 1e-5)")
    ap.add_argument("--heads", default="all", help="all (default), a count K spread over the model, or labels")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--warmup", action="store_true",
                    help="one untimed forward before the scan (for a benchmark that extrapolates scan_s)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    return args


def main() -> None:
    args = script_args(__doc__.split("\n\n")[0], "a Hugging Face model folder (or hub id)",
                       "JSON: {token_ids, pad_token_id} or {texts}")

    inputs = json.loads(Path(args.inputs).read_text(encoding="utf-8"))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    if "token_ids" in inputs:
        token_ids = [list(map(int, t)) for t in inputs["token_ids"]]
        pad_id = int(inputs.get("pad_token_id") or 0)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        token_ids = [tokenizer(t)["input_ids"] for t in inputs["texts"]]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t_loaded = time.perf_counter()

    cfg = model.config
    n_heads = cfg.num_attention_heads
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    heads = pick_heads(args.heads, cfg.num_hidden_layers, n_heads)
    batch = left_padded_batch(token_ids, pad_id)

    def last_logprobs() -> torch.Tensor:
        logits = model(**batch, use_cache=False, logits_to_keep=1).logits[:, -1]  # (prompts, vocab)
        return torch.log_softmax(logits.double(), dim=-1)

    if args.warmup:
        last_logprobs()
    t_warm = time.perf_counter()
    ref = last_logprobs()
    p_ref = ref.exp()
    kl = np.empty((len(heads), len(token_ids)), dtype=np.float64)
    for i, (layer, head) in enumerate(heads):
        q_proj = model.model.layers[layer].self_attn.q_proj
        rows = slice(head * d_head, (head + 1) * d_head)
        saved_w = q_proj.weight[rows].clone()
        saved_b = q_proj.bias[rows].clone() if q_proj.bias is not None else None
        try:
            q_proj.weight[rows] *= args.eps
            if saved_b is not None:
                q_proj.bias[rows] *= args.eps
            logq = last_logprobs()
        finally:
            q_proj.weight[rows] = saved_w
            if saved_b is not None:
                q_proj.bias[rows] = saved_b
        kl[i] = (p_ref * (ref - logq)).sum(-1).numpy()
    t_scanned = time.perf_counter()

    write_result("peer", Path(args.out), kl, heads, len(token_ids), args.eps, 1 + len(heads),
                 (T_START, T_IMPORTED, t_loaded, t_warm, t_scanned))


def write_result(who: str, out: Path, kl: np.ndarray, heads: list[tuple[int, int]], n_prompts: int, eps: float,
                 forwards: int, stamps: tuple[float, float, float, float, float]) -> dict:
    """Save the (heads x prompts) KL matrix as OUT (.npy) and the timings as OUT.json; print one line.
    `stamps`: the script's start, imports done, model loaded, warm-up done, scan done (perf_counter)."""
    start, imported, loaded, warm, scanned = stamps
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, np.asarray(kl, dtype=np.float64))
    meta = {
        "heads": [f"L{layer}H{head}" for layer, head in heads],
        "n_prompts": n_prompts,
        "eps": eps,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "import_s": imported - start,
        "load_s": loaded - imported,
        "warmup_s": warm - loaded,
        "scan_s": scanned - warm,
        "forwards": forwards,
        "wall_s": time.perf_counter() - start,  # from the top of the script (the interpreter's start excluded)
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    print(f"{who}: {len(heads)} heads x {n_prompts} prompts in {meta['wall_s']:.1f} s "
          f"(imports {meta['import_s']:.1f} s, load {meta['load_s']:.1f} s, scan {meta['scan_s']:.1f} s, "
          f"{forwards} forwards)")
    return meta


if __name__ == "__main__":
    main()
