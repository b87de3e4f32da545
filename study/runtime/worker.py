"""The worker: one loaded model that turns shards into Arrow record batches.

A plain class (no Ray): the local executor holds one per model in this process, and a Ray `ModelActor` is a
thin wrapper around one. It loads the model once and keeps it, with the token ids of every prompt it has
seen and the normal model's hidden states of every prompt block, for every shard, experiment and Sahara
step of a run. It returns only what the shard's measure needs, on the CPU, as Arrow.

It also runs the shards of the head recipes whose host its model is (`ModelRef.host`): each inside a scoped edit
that writes the donor's head slices in and puts the model's own back after (`study.models.mixing.swapped`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, Sequence

import pyarrow as pa
import torch

from study.core.ablation import Ablation, Op
from study.core.engine import ScanEngine
from study.core.errors import DonorError, UsageError, one_line
from study.core.heads import Head
from study.core.interventions import ablated
from study.core.scores import generalized_ships_batch, token_nll
from study.core.subspace import SubspaceSpec
from study.generation.backends import Generator, backend_class
from study.generation.decoding import sample_seed
from study.models.loading import LoadedModel, load_model, load_tokenizer
from study.prompts.formats import encode
from study.runtime.shards import AnyShard, EvalShard, GenShard, JointShard, ModelRef, PromptBlock, SurgeryShard

log = logging.getLogger(__name__)

# candidates per engine call: bounds the (candidates, prompts, d_model) hidden-state block held at once
CANDIDATE_BLOCK = 128


class GeneralizedShipsScorer:
    """score(G, candidates)[i] = generalized Ships of G ∪ {candidates[i]} against the NORMAL model.

    For a chosen group G it caches the G-ablated model's residuals once and starts every candidate
    G ∪ {h} at layer(h), so a step costs far less than one forward per candidate per prompt.
    """

    def __init__(self, engine: ScanEngine, token_ids: Sequence[Sequence[int]], spec: SubspaceSpec, op: Op,
                 eps: float, progress: Callable[[int], None] | None = None,
                 normal: torch.Tensor | None = None) -> None:
        self.engine, self.token_ids, self.spec, self.op, self.eps = engine, token_ids, spec, op, eps
        self.progress = progress
        if normal is None:
            normal = engine.scan(token_ids, [Ablation(op=op, eps=eps)], kl=False).hidden[0]
        self.normal = normal.double()  # (prompts, d_model)

    def score_ablations(self, base: Ablation, ablations: Sequence[Ablation]) -> list[float]:
        """Generalized Ships of each ablation (rows start from `base`'s residuals where they agree)."""
        scores: list[float] = []
        for i in range(0, len(ablations), CANDIDATE_BLOCK):
            block = ablations[i:i + CANDIDATE_BLOCK]
            res = self.engine.scan(self.token_ids, block, base=base, kl=False, progress=self.progress)
            scores += generalized_ships_batch(self.normal, res.hidden.double(), self.spec).tolist()
        return scores

    def __call__(self, group: tuple[Head, ...], candidates: Sequence[Head]) -> list[float]:
        base = Ablation(heads=group, op=self.op, eps=self.eps)
        return self.score_ablations(base, [base.with_head(h) for h in candidates])


def resolve_device(device: str) -> str:
    """`auto` becomes cuda where this process sees a GPU (a Ray actor holding one), else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class Worker:
    """Holds one model and runs shards for it.

    The HF model loads on the first shard that needs it (scoring, HF generation) and stays; a worker that
    only generates through vLLM never loads it (the engine holds its own copy of the weights).
    """

    def __init__(self, model: ModelRef, *, device: str = "cpu", token_budget: int | None = None,
                 threads: int | None = None, lm: LoadedModel | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.ref = model
        self.device = resolve_device(device)
        self.token_budget = token_budget
        self._lm = lm
        self._tokenizer = None if lm is None else lm.tokenizer
        self._engines: dict[ModelRef, ScanEngine] = {}  # per model run here: its own weights, its own kept passes
        self._donors: dict[ModelRef, list[torch.Tensor]] = {}  # a head recipe's donor slices, read once
        self._current = model  # the model (this one, or a head recipe it hosts) whose shard is running
        self._generators: dict[str, Generator] = {}
        self._tokens: dict[tuple[str, str, str | None], list[int]] = {}
        self._normal: dict[tuple[ModelRef, str], torch.Tensor] = {}  # (model, prompt block) -> (prompts, d_model)
        log.info("worker %d: %s on %s (%s), %d threads", os.getpid(), model.label, self.device, model.dtype,
                 torch.get_num_threads())

    @property
    def lm(self) -> LoadedModel:
        if self._lm is None:
            if self.ref.swap is not None:
                from study.models.mixing import load_mixed

                self._lm = load_mixed(self.ref.swap, self.ref.revision, self.ref.dtype, device=self.device)
            else:
                self._lm = load_model(self.ref.name, device=self.device, dtype=self.ref.dtype,
                                      revision=self.ref.revision)
            self._tokenizer = self._lm.tokenizer
        return self._lm

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.ref.name, self.ref.revision)
        return self._tokenizer

    @property
    def engine(self) -> ScanEngine:
        """The scan engine of the model whose shard runs: weights change only between models (a hosted head
        recipe's edit), so within one a prompt block's base pass serves all its shards."""
        if self._current not in self._engines:
            self._engines[self._current] = ScanEngine(self.lm.model, self.lm.tokenizer.pad_token_id,
                                                      token_budget=self.token_budget, keep_bases=True)
        return self._engines[self._current]

    def _donor(self, model: ModelRef) -> list[torch.Tensor]:
        """The donor's slices of the head recipe `model` (hosted here), read on first use and kept."""
        if model not in self._donors:
            from study.models.mixing import donor_slices

            name, revision = model.donor
            self._donors[model] = donor_slices(self.lm.model, name, revision, model.swap.heads, model.dtype)
            log.info("worker %d: %s hosted as an edit of %s (%d slices of %s)", os.getpid(), model.label,
                     self.ref.label, len(self._donors[model]), name)
        return self._donors[model]

    @contextlib.contextmanager
    def _running(self, model: ModelRef):
        """The worker's model as `model` is: itself, or with a hosted head recipe's edit in, for one shard."""
        if model == self.ref:
            yield
            return
        if model.host != self.ref:
            raise ValueError(f"shard for {model.label!r} sent to the worker of {self.ref.label!r}")
        from study.models.mixing import swapped

        self._current = model
        try:
            with swapped(self.lm.model, model.swap.heads, self._donor(model)):
                yield
        finally:
            self._current = self.ref

    def generator(self, backend: str) -> Generator:
        """The generation backend `backend` for this model, created on first use and kept."""
        if backend not in self._generators:
            if backend != "hf" and self.ref.swap is not None:
                raise ValueError(f"a mixed model ({self.ref.label}) lives in memory only: generate with the hf "
                                 f"backend")
            if backend != "hf" and self.device.startswith("cuda") and self._lm is not None:
                # an engine takes most of the GPU for itself: free the HF copy (reloaded if a scan needs it)
                self._lm, self._engines, self._normal = None, {}, {}
                self._generators.pop("hf", None)
                torch.cuda.empty_cache()
            self._generators[backend] = backend_class(backend).for_worker(self)
        return self._generators[backend]

    def prepare(self, shard: AnyShard) -> None:
        """Load what `shard` needs and is not loaded yet: the model (scoring, HF generation) or its generation
        backend's engine. Its errors are the model's, not the shard's: a corrupt file, a missing folder."""
        if isinstance(shard, GenShard):
            _ = self.tokenizer
            self.generator(shard.backend)
        else:
            _ = self.lm
        if shard.model != self.ref and shard.model.host == self.ref:
            try:
                self._donor(shard.model)
            except Exception as err:
                raise DonorError(f"{shard.model.label}: {one_line(err)}") from err

    def close(self) -> None:
        """Release a backend's engine (vLLM runs its own processes)."""
        for gen in self._generators.values():
            close = getattr(gen, "close", None)
            if close is not None:
                close()
        self._generators.clear()

    def token_ids(self, block: PromptBlock) -> list[list[int]]:
        out = []
        for pid, text in zip(block.ids, block.texts):
            key = (pid, block.format.value, block.system_prompt)
            if key not in self._tokens:
                self._tokens[key] = encode(text, block.format, self.tokenizer, block.system_prompt)
            out.append(self._tokens[key])
        return out

    def run(self, shard: AnyShard, progress: Callable[[int], None] | None = None) -> pa.RecordBatch:
        """Compute one shard; returns its record batch (schema `shard.schema`)."""
        if isinstance(shard, GenShard) and shard.backend != "hf" and shard.model.swap is not None:
            raise ValueError(f"a mixed model ({shard.model.label}) lives in memory only: generate with the hf backend")
        with self._running(shard.model):
            return self._run(shard, progress)

    def _run(self, shard: AnyShard, progress: Callable[[int], None] | None) -> pa.RecordBatch:
        if isinstance(shard, GenShard):
            return self.generate(shard)
        if isinstance(shard, EvalShard):
            return self.lm_eval(shard)
        if isinstance(shard, SurgeryShard):
            return self.surgery(shard)
        if isinstance(shard, JointShard):
            return self.joint(shard, progress)
        _ = self.lm  # scoring needs the model: load it (with its tokenizer) first, not a tokenizer on its own too
        ids = self.token_ids(shard.prompts)
        labels = [a.label for a in shard.ablations]
        if shard.measure == "kl":
            res = self.engine.scan(ids, shard.ablations, base=shard.base, kl=True, hidden=False, progress=progress)
            kl = res.kl  # (ablations, prompts)
            n_p = len(ids)
            columns = [pa.array([lab for lab in labels for _ in range(n_p)]),
                       pa.array(list(shard.prompts.ids) * len(labels)), pa.array(kl.flatten().tolist())]
        elif shard.measure == "nll":
            nll, n_tok = self.nll(ids, shard.ablations)  # (ablations, prompts)
            columns = [pa.array([lab for lab in labels for _ in ids]), pa.array(list(shard.prompts.ids) * len(labels)),
                       pa.array(nll.flatten().tolist(), pa.float64()), pa.array(n_tok.flatten().tolist(), pa.int64())]
        else:
            if shard.subspace is None:
                raise ValueError("an angle shard needs a subspace spec")
            key = (self._current, shard.prompts.key)
            if key not in self._normal:
                self._normal[key] = self.engine.scan(ids, [Ablation()], kl=False).hidden[0]
            scorer = GeneralizedShipsScorer(self.engine, ids, shard.subspace, shard.base.op, shard.base.eps,
                                            progress=progress, normal=self._normal[key])
            columns = [pa.array(labels), pa.array(scorer.score_ablations(shard.base, list(shard.ablations)),
                                                  type=pa.float64())]
        return pa.RecordBatch.from_arrays(columns, schema=shard.schema)

    def nll(self, ids: list[list[int]], ablations: Sequence[Ablation], batch: int = 8) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
        """(ablations, prompts) summed NLL and token counts, each ablation scoped by hooks on the model."""
        model = self.lm.model
        device = model.get_input_embeddings().weight.device
        pad = self.lm.tokenizer.pad_token_id or 0
        nll = torch.zeros(len(ablations), len(ids), dtype=torch.float64)
        count = torch.zeros(len(ablations), len(ids), dtype=torch.long)
        for a, ab in enumerate(ablations):
            with ablated(model, ab), torch.no_grad():
                for i in range(0, len(ids), batch):
                    rows = ids[i:i + batch]
                    width = max(len(r) for r in rows)
                    x = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)  # (b, seq)
                    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
                    logits = model(input_ids=x, attention_mask=mask).logits  # (b, seq, vocab)
                    s, n = token_nll(logits, x.to(logits.device), mask.to(logits.device))
                    nll[a, i:i + len(rows)] = s.double().cpu()
                    count[a, i:i + len(rows)] = n.cpu()
        return nll, count

    def lm_eval(self, shard: EvalShard) -> pa.RecordBatch:
        """lm-eval's tasks under each ablation (hooks), one row per (ablation, metric), one per failed task."""
        from study.generation.lm_eval import run_lm_eval

        result = run_lm_eval(self.lm.model, self.lm.tokenizer, shard.ablations, shard.tasks, shard.include,
                             shard.limit)
        columns = result.columns()
        return pa.RecordBatch.from_arrays([pa.array(columns[f.name], f.type) for f in shard.schema],
                                          schema=shard.schema)

    def surgery(self, shard: SurgeryShard) -> pa.RecordBatch:
        """The checkpoint with the ablation written in; the loaded weights are put back after the save."""
        from study.models.surgery import save_ablated

        info = save_ablated(self.lm, shard.ablation, shard.checkpoint, may_hold=shard.may_hold,
                            record={"source_fingerprint": shard.model.fingerprint})
        values = {"checkpoint": shard.checkpoint, **info}
        return pa.RecordBatch.from_arrays([pa.array([values[f.name]], f.type) for f in shard.schema],
                                          schema=shard.schema)

    def joint(self, shard: JointShard, progress: Callable[[int], None] | None = None) -> pa.RecordBatch:
        """One link of the joint search: its steps (gates after each) and where it stands at the end; on the
        search's last link, the exact objective of its top 1..k heads too."""
        from study.core.joint import group_objectives, joint_search, top_group
        from study.core.joint_spec import Objective

        ids = self.token_ids(shard.prompts)
        kept, targets = None, None
        if shard.state is not None and shard.state.prompts is not None:
            kept, targets = list(shard.state.prompts), [list(t) for t in shard.state.targets]
        elif shard.settings.objective is Objective.REFUSAL:
            kept, targets = self._refusal_openings(shard, ids)
        if kept is not None:
            ids = [ids[i] for i in kept]
        pad = self.lm.tokenizer.pad_token_id or 0
        core = shard.state.model_copy(update={"prompts": None, "targets": None}) if shard.state else None
        result = joint_search(self.lm.model, ids, pad, shard.settings, targets,
                              on_step=(lambda row: progress(1)) if progress else None, state=core, until=shard.end)
        state = result.state
        if kept is not None:
            state = state.model_copy(update={"prompts": tuple(kept), "targets": tuple(tuple(t) for t in targets)})
        exact = None
        if shard.last:
            group = top_group(result.gates, shard.k)
            exact = group_objectives(self.lm.model, ids, pad, shard.settings,
                                     [group[:size] for size in range(1, shard.k + 1)], targets)
        steps = len(result.history)
        gates = result.gate_history  # (steps, layers * heads)
        columns = {"step": [r["step"] for r in result.history], "loss": [r["loss"] for r in result.history],
                   "objective": [r["objective"] for r in result.history],
                   "penalty": [r["penalty"] for r in result.history], "open": [r["open"] for r in result.history],
                   "gates": gates, "exact": [None] * (steps - 1) + [exact], "prompts_used": [len(ids)] * steps,
                   "state": [None] * (steps - 1) + [state.model_dump_json()]}
        return pa.RecordBatch.from_arrays([pa.array(columns[f.name], f.type) for f in shard.schema],
                                          schema=shard.schema)

    def _refusal_openings(self, shard: JointShard, ids: list[list[int]]) -> tuple[list[int], list[list[int]]]:
        """The prompts the model refuses (greedy answer, `refusal` judge; their indices) and each one's answer
        opening."""
        from study.generation.decoding import Decoding
        from study.generation.judges.registry import get_judge

        dec = Decoding(max_new_tokens=shard.answer_tokens)
        answers = self.generator("hf").generate(ids, [Ablation()] * len(ids), dec, [0] * len(ids))
        texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in answers]
        verdicts = get_judge("refusal").judge_many(list(shard.prompts.texts), texts)
        kept = [i for i, v in enumerate(verdicts) if v.refused and answers[i]]
        if not kept:
            raise UsageError(f"joint: {shard.model.label} refuses none of the {len(ids)} prompts, so the refusal "
                             f"objective has nothing to remove: use objective subspace, or prompts it refuses")
        log.info("joint: %s refuses %d of %d prompts; their first %d answer tokens are the targets",
                 shard.model.label, len(kept), len(ids), shard.opening_tokens)
        return kept, [list(answers[i][:shard.opening_tokens]) for i in kept]

    def generate(self, shard: GenShard) -> pa.RecordBatch:
        """One row per (prompt, ablation, sample): token ids, text and the seed that drew them."""
        ids = self.token_ids(shard.prompts)
        dec = shard.decoding
        rows = [(i, ab, k) for i, ab in shard.pairs() for k in range(dec.samples)]
        seeds = [sample_seed(dec.seed, shard.prompts.ids[i], k) for i, _, k in rows]
        tokens = self.generator(shard.backend).generate([ids[i] for i, _, _ in rows], [ab for _, ab, _ in rows],
                                                        dec, seeds)
        texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
        columns = [pa.array([ab.label for _, ab, _ in rows]), pa.array([shard.prompts.ids[i] for i, _, _ in rows]),
                   pa.array([k for _, _, k in rows], pa.int32()), pa.array(seeds, pa.int64()),
                   pa.array(tokens, pa.list_(pa.int32())), pa.array(texts), pa.array([len(t) for t in tokens],
                                                                                     pa.int32())]
        return pa.RecordBatch.from_arrays(columns, schema=shard.schema)
