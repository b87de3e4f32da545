"""The declared Arrow schema of every result table, and `make_table` to build tables that conform to it.

One schema per table, so writers cannot drift and readers (the `analysis` package, users' scripts) can rely
on column names and types. Every table starts with the run metadata columns. Fields are non-nullable unless
a missing value is meaningful (`model_revision`, `matched_rule`, `p_mcnemar`).

Two forms of one schema: the declared one (plain strings) is what the files hold and `read_table` gives; the
compact one (`compact_schema`) is how tables are assembled in memory: every top-level string column whose
values repeat down the table (model, dataset, prompt, head label, op...) is dictionary-encoded, one copy of
each value and an int32 index per row, so a sweep's Ships rows do not hold the prompt's text once per head.
Only a generation's `text`, one per row, stays plain.

No torch here: `analysis` imports this module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

__all__ = [
    "ASR",
    "ASR_CURVE",
    "GENERATIONS",
    "HEAD_SCORES",
    "JOINT",
    "JOINT_STEPS",
    "META_COLUMNS",
    "OVERLAP",
    "RANKINGS",
    "SAHARA",
    "SHIPS",
    "SPECIFICITY",
    "SWAPS",
    "TABLES",
    "UTILITY",
    "VERDICTS",
    "DICT_STRING",
    "compact_schema",
    "declared_form",
    "make_table",
    "schema_for",
]


def _f(name: str, type_: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable)


_META: list[pa.Field] = [
    _f("run_id", pa.string()),
    _f("model", pa.string()),  # HF id, local path or built-in alias, as given
    _f("model_revision", pa.string(), nullable=True),
    _f("dataset", pa.string()),
    _f("prompt_format", pa.string()),
    _f("code_version", pa.string()),
]
META_COLUMNS: tuple[str, ...] = tuple(f.name for f in _META)

_HEAD: list[pa.Field] = [
    _f("layer", pa.int32()),
    _f("head", pa.int32()),
    _f("head_label", pa.string()),  # L2H26
]
_ABLATION: list[pa.Field] = [
    _f("op", pa.string()),  # undiff_q | undiff_k | scale_v | mean
    _f("eps", pa.float64()),
]
_SUBSPACE: list[pa.Field] = [
    _f("subspace", pa.string()),  # left | right
    _f("rank_r", pa.int32()),
    _f("centered", pa.bool_()),
]


# False: a screened (low-precision) score that was not re-scored; null in tables written before screening
_EXACT = _f("exact", pa.bool_(), nullable=True)


def _schema(*groups: Sequence[pa.Field]) -> pa.Schema:
    return pa.schema([f for g in groups for f in g])


SHIPS = _schema(
    _META,
    [_f("prompt_id", pa.string()), _f("prompt", pa.string())],
    _HEAD,
    _ABLATION,
    [_f("kl", pa.float64()), _f("rank", pa.int32()), _EXACT],  # rank 1 = largest KL within the prompt
)

HEAD_SCORES = _schema(
    _META,
    _HEAD,
    _ABLATION,
    _SUBSPACE,
    [_f("angle_deg", pa.float64()), _f("rank", pa.int32()), _EXACT],  # rank 1 = largest angle
)

SAHARA = _schema(
    _META,
    _ABLATION,
    _SUBSPACE,
    [_f("step", pa.int32())],  # 1-based
    _HEAD,
    [
        _f("group", pa.list_(pa.string())),  # labels chosen before this step
        _f("score", pa.float64()),
        _f("chosen", pa.bool_()),
        _EXACT,
    ],
)

_CONDITION: list[pa.Field] = [
    _f("condition", pa.string()),  # normal | heads | sahara | query | random
    _f("group_size", pa.int32()),  # heads ablated (per prompt for query / random-per-prompt); 0 for normal
    _f("draw", pa.int32()),  # which random draw (0 for everything that is not a control)
    _f("ablation", pa.string()),  # "none" or "undiff_q:1e-05:L2H26,L3H8" (query level: "query:top1")
]

GENERATIONS = _schema(
    _META,
    [_f("prompt_id", pa.string()), _f("prompt", pa.string())],
    _CONDITION,
    _ABLATION,
    [
        _f("backend", pa.string()),  # hf | vllm
        _f("decoding", pa.string()),  # greedy | topk5-t1
        _f("max_new_tokens", pa.int32()),
        _f("seed", pa.int64()),  # the (prompt, sample) seed the tokens were drawn with
        _f("sample", pa.int32()),
        _f("text", pa.string()),
        _f("n_tokens", pa.int32()),  # generated tokens, the stop token included when one ended the text
    ],
)

VERDICTS = _schema(
    _META,
    [_f("prompt_id", pa.string())],
    _CONDITION,
    [
        _f("decoding", pa.string()),
        _f("sample", pa.int32()),
        _f("judge", pa.string()),  # name@version
        _f("harmful", pa.bool_()),  # complied: counts toward ASR
        _f("refused", pa.bool_()),
        _f("degenerate", pa.bool_()),  # repetition, an echo of the prompt, or no words
        _f("matched_rule", pa.string(), nullable=True),  # the rule that decided (outcome judge: <outcome>:<family>)
        # refusal | answer (= harmful) | non_answer (neither: a generic offer, an echo, short or broken text);
        # null in tables written before outcomes (read it from harmful / refused there)
        _f("outcome", pa.string(), nullable=True),
    ],
)

ASR = _schema(
    _META,
    [_f("kind", pa.string())],  # harmful (ASR) | benign (over-refusal: refusal_rate)
    _CONDITION,
    _ABLATION,
    [
        _f("decoding", pa.string()),
        _f("judge", pa.string()),
        _f("n", pa.int64()),  # generations judged (prompts x samples)
        _f("harmful", pa.int64()),
        _f("asr", pa.float64()),
        _f("ci_low", pa.float64()),  # Wilson 95%
        _f("ci_high", pa.float64()),
        _f("p_mcnemar", pa.float64(), nullable=True),  # exact, vs the normal model; null for the normal row
        _f("refused", pa.int64()),
        _f("refusal_rate", pa.float64()),
        _f("degenerate", pa.int64()),
        _f("degenerate_frac", pa.float64()),
        # neither refused nor answered: n - harmful - refused (an ablation that turns refusals into evasions,
        # not into help, raises this instead of ASR); null in tables written before outcomes
        _f("non_answer", pa.int64(), nullable=True),
        _f("non_answer_rate", pa.float64(), nullable=True),
    ],
)

SWAPS = _schema(
    _META,  # `model`: the aligned model the mixed one is built from; `dataset`: the prompt set measured
    [
        _f("aligned", pa.string()),
        _f("base", pa.string()),
        _f("recipe", pa.string()),  # aligned | base | attn-from-base | mlp-from-base | heads-from-base | heads-into-base
        _f("heads", pa.list_(pa.string())),  # the safety heads a head recipe moves (empty for whole-module ones)
        _f("kind", pa.string()),  # harmful | benign | ships
        _f("metric", pa.string()),  # asr | refusal_rate | non_answer_rate | degenerate_frac | ships:<head label> (mean KL)
        _f("judge", pa.string(), nullable=True),  # name@version for generation metrics
        _f("n", pa.int64()),  # generations judged, or prompts averaged for ships
        _f("value", pa.float64()),
        _f("ci_low", pa.float64(), nullable=True),  # Wilson 95% for rates
        _f("ci_high", pa.float64(), nullable=True),
    ],
)

# ---- derived tables (built by `analysis` from the tables above; no model work) ----

_VARIANT: list[pa.Field] = [  # a generalized-Ships (head_scores) ranking's settings; null for Ships rankings
    _f("subspace", pa.string(), nullable=True),
    _f("rank_r", pa.int32(), nullable=True),
    _f("centered", pa.bool_(), nullable=True),
]

RANKINGS = _schema(
    _META,
    [_f("source", pa.string())],  # ships (mean KL over prompts) | head_scores (generalized Ships angle)
    _VARIANT,
    _HEAD,
    _ABLATION,
    [
        _f("n_heads", pa.int32()),  # heads ranked in this condition (the N of the overlap null model)
        _f("n_prompts", pa.int32(), nullable=True),  # prompts averaged (ships); null for head_scores
        _f("score", pa.float64()),  # mean KL (ships) or angle in degrees (head_scores)
        _f("topk_frac", pa.float64(), nullable=True),  # share of prompts with per-prompt rank <= k (ships)
        _f("k", pa.int32()),  # the k of topk_frac, capped by n_heads
        _f("rank", pa.int32()),  # 1 = most important
        _f("specificity", pa.float64(), nullable=True),  # kl_harmful / (kl_harmful + kl_benign); see SPECIFICITY
    ],
)

OVERLAP = _schema(  # rows span models: no `model` column (stored in one `_all` folder)
    [_f("run_id", pa.string()), _f("code_version", pa.string())],
    [
        _f("source", pa.string()),
        _f("variant", pa.string(), nullable=True),  # head_scores settings, e.g. left:r1; null for ships
        _f("axis", pa.string()),  # models | datasets | ops: what varies across the compared conditions
        _f("prompt_format", pa.string()),
        _f("k", pa.int32()),
        _f("n_heads", pa.int32()),  # N: heads each top-k set is drawn from
        _f("n_sets", pa.int32()),
        _f("members", pa.list_(pa.string())),  # condition labels model|dataset|op|format
        _f("models", pa.list_(pa.string())),  # aligned with members
        _f("datasets", pa.list_(pa.string())),
        _f("ops", pa.list_(pa.string())),
        _f("eps", pa.list_(pa.float64())),
        _f("shared", pa.int32()),  # size of the intersection of the top-k sets
        _f("shared_heads", pa.list_(pa.string())),  # sorted by layer, then head
        _f("union_size", pa.int32()),
        _f("jaccard", pa.float64()),
        _f("expected_shared", pa.float64()),  # N * (k/N)^n_sets under independent uniform top-k sets
        _f("p_value", pa.float64()),  # exact P(intersection >= shared) under that null
    ],
)

SPECIFICITY = _schema(
    _META,  # `dataset`: the harmful prompt set
    [_f("benign_dataset", pa.string())],
    _HEAD,
    _ABLATION,
    [
        _f("n_harmful", pa.int32()),  # prompts averaged on each side
        _f("n_benign", pa.int32()),
        _f("kl_harmful", pa.float64()),  # mean Ships KL over the prompts
        _f("kl_benign", pa.float64()),
        _f("specificity", pa.float64()),  # kl_harmful / (kl_harmful + kl_benign) in [0, 1]; 0.5 = no preference
        _f("log2_ratio", pa.float64(), nullable=True),  # log2(kl_harmful / kl_benign); null when either is 0
        _f("rank_harmful", pa.int32()),  # by kl_harmful, 1 = largest
        _f("rank_specific", pa.int32()),  # by kl_harmful * specificity (safety-specific importance)
        # specificity's 95% percentile bootstrap interval over prompts (each set resampled on its own); null
        # with fewer than 2 prompts on a side, and in tables written before it
        _f("spec_ci_low", pa.float64(), nullable=True),
        _f("spec_ci_high", pa.float64(), nullable=True),
    ],
)

ASR_CURVE = _schema(
    _META,
    [
        _f("kind", pa.string()),  # harmful (read asr) | benign (read refusal_rate: over-refusal)
        _f("condition", pa.string()),  # normal (group_size 0) | heads | sahara | query
        _f("ablation", pa.string()),
        _f("group_size", pa.int32()),
    ],
    _ABLATION,
    [
        _f("decoding", pa.string()),
        _f("judge", pa.string()),
        _f("n", pa.int64()),
        _f("harmful", pa.int64()),
        _f("asr", pa.float64()),
        _f("ci_low", pa.float64()),  # Wilson 95%
        _f("ci_high", pa.float64()),
        _f("p_mcnemar", pa.float64(), nullable=True),  # vs the normal model; null for the normal row
        _f("refusal_rate", pa.float64()),
        _f("degenerate_frac", pa.float64()),
        _f("non_answer_rate", pa.float64(), nullable=True),  # n - harmful - refused, over n
        _f("normal_asr", pa.float64(), nullable=True),  # the unablated model's level (pooled normal rows)
        _f("normal_refusal_rate", pa.float64(), nullable=True),
        _f("normal_degenerate_frac", pa.float64(), nullable=True),
        _f("normal_non_answer_rate", pa.float64(), nullable=True),
        _f("delta_asr", pa.float64(), nullable=True),  # asr - normal_asr
        _f("random_draws", pa.int32()),  # random-head controls of the same size (0: none)
        _f("random_asr_mean", pa.float64(), nullable=True),
        _f("random_asr_min", pa.float64(), nullable=True),
        _f("random_asr_max", pa.float64(), nullable=True),
        _f("random_refusal_mean", pa.float64(), nullable=True),
        _f("random_refusal_min", pa.float64(), nullable=True),
        _f("random_refusal_max", pa.float64(), nullable=True),
        _f("random_degenerate_mean", pa.float64(), nullable=True),
        _f("random_non_answer_mean", pa.float64(), nullable=True),
    ],
)

_JOINT_RUN: list[pa.Field] = [
    _f("objective", pa.string()),  # refusal | subspace
    _f("sparsity", pa.string()),  # l1 | hard_concrete
    _f("steps", pa.int32()),
    _f("lr", pa.float64()),
    _f("l1", pa.float64()),
]

JOINT = _schema(  # one row per (seed, head): the joint search's final gates
    _META,
    _ABLATION,
    _SUBSPACE,
    _JOINT_RUN,
    [_f("seed", pa.int32())],
    _HEAD,
    [
        _f("gate", pa.float64()),  # 0 normal .. 1 ablated, after the last step
        _f("rank", pa.int32()),  # 1 = largest gate of this seed
        _f("group", pa.list_(pa.string())),  # this seed's top-k heads, largest gate first
        _f("in_group", pa.bool_()),
        _f("selected", pa.bool_()),  # this seed's group is the search's (its k-group's exact objective is largest)
        # rank <= k: the exact objective of the heads ranked 1..rank ablated outright (refusal: the drop of the
        # openings' probability; subspace: generalized Ships, degrees); null below the group
        _f("score", pa.float64(), nullable=True),
        _f("prompts_used", pa.int32()),  # refusal: the prompts the model refused, searched on; else all
    ],
)

JOINT_STEPS = _schema(  # one row per (seed, optimisation step)
    _META,
    [
        _f("objective", pa.string()),
        _f("seed", pa.int32()),
        _f("step", pa.int32()),  # 1-based
        _f("loss", pa.float64()),  # penalty - value
        _f("value", pa.float64()),  # the smooth objective the step maximised (refusal: log(1 - p) gained)
        _f("penalty", pa.float64()),
        _f("open", pa.int32()),  # gates above 0.5 after the step
    ],
)

UTILITY = _schema(
    _META,  # `dataset`: the text the perplexity is measured on
    _CONDITION,
    _ABLATION,
    [
        _f("metric", pa.string()),  # perplexity | lm_eval:<task>:<metric>[:<filter>] | lm_eval:<task> (failed)
        _f("value", pa.float64(), nullable=True),  # null where the task failed
        _f("n", pa.int64()),  # tokens scored (perplexity) or examples (lm-eval); 0 where the task failed
        _f("ratio", pa.float64(), nullable=True),  # value / the normal model's value
        _f("error", pa.string(), nullable=True),  # why an lm-eval task gave no value for this head set
    ],
)

TABLES: dict[str, pa.Schema] = {
    "ships": SHIPS,
    "head_scores": HEAD_SCORES,
    "sahara": SAHARA,
    "joint": JOINT,
    "joint_steps": JOINT_STEPS,
    "generations": GENERATIONS,
    "verdicts": VERDICTS,
    "asr": ASR,
    "swaps": SWAPS,
    "rankings": RANKINGS,
    "overlap": OVERLAP,
    "specificity": SPECIFICITY,
    "asr_curve": ASR_CURVE,
    "utility": UTILITY,
}


DICT_STRING = pa.dictionary(pa.int32(), pa.string())
_UNIQUE_STRINGS = frozenset({"text"})  # one value per row: a dictionary would only add an index


def _repeats(field: pa.Field) -> bool:
    return pa.types.is_string(field.type) and field.name not in _UNIQUE_STRINGS


def compact_schema(schema: pa.Schema) -> pa.Schema:
    """`schema` as tables are held in memory: repeated string columns dictionary-encoded."""
    return pa.schema([pa.field(f.name, DICT_STRING, nullable=f.nullable) if _repeats(f) else f for f in schema])


def declared_form(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A compact (or declared) table in the declared schema: dictionary columns decoded, as files hold them.
    ValueError unless the table is in one of the two forms of `schema`."""
    if table.schema.equals(schema, check_metadata=False):
        return table
    if not table.schema.equals(compact_schema(schema), check_metadata=False):
        raise ValueError(f"got:\n{table.schema}\nexpected:\n{schema}\n(or its compact form)")
    return table.cast(schema)


def schema_for(name: str) -> pa.Schema:
    """The declared schema of table `name`; ValueError naming the known tables otherwise."""
    try:
        return TABLES[name]
    except KeyError:
        raise ValueError(f"unknown table {name!r}: known tables are {', '.join(TABLES)}") from None


def _castable(src: pa.DataType, dst: pa.DataType) -> bool:
    """Whether values of `src` may become `dst`: same kind only (no string<->number coercion)."""
    if src == dst or pa.types.is_null(src):
        return True
    numeric = (pa.types.is_integer, pa.types.is_floating)
    if any(k(src) for k in numeric) and any(k(dst) for k in numeric):
        return True  # a lossy float -> int cast is caught by the safe cast
    stringy = (pa.types.is_string, pa.types.is_large_string)
    if any(k(src) for k in stringy) and any(k(dst) for k in stringy):
        return True
    if pa.types.is_boolean(src) and pa.types.is_boolean(dst):
        return True
    lists = (pa.types.is_list, pa.types.is_large_list)
    if any(k(src) for k in lists) and any(k(dst) for k in lists):
        return _castable(src.value_type, dst.value_type)
    return False


def _column(table: str, field: pa.Field, values: Any) -> pa.Array | pa.ChunkedArray:
    """One column converted to its declared type, refusing silent coercions (pa.array(..., type=int32)
    would truncate 1.5 to 1) and nulls in non-nullable fields."""
    where = f"table {table!r} column {field.name!r}"
    try:
        arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ValueError(f"{where}: cannot convert values: {e}") from None
    # the values' type and the declared one, seen through a dictionary (study.runtime.columns, the compact form)
    encoded = pa.types.is_dictionary(arr.type)
    got = arr.type.value_type if encoded else arr.type
    target = field.type.value_type if pa.types.is_dictionary(field.type) else field.type
    if not _castable(got, target):
        raise ValueError(f"{where}: expected {target}, got values of type {got}")
    if got != target:
        try:
            arr = arr.cast(pa.dictionary(arr.type.index_type, target) if encoded else target, safe=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
            raise ValueError(f"{where}: cannot cast {got} to {target}: {e}") from None
    if pa.types.is_dictionary(field.type) and not encoded:
        arr = arr.dictionary_encode()
    if arr.type != field.type:  # a dictionary's index type, or a dictionary where plain values are declared
        arr = arr.cast(field.type)
    if not field.nullable and arr.null_count:
        raise ValueError(f"{where}: {arr.null_count} null value(s) in a non-nullable column")
    return arr


def _check_columns(table: str, schema: pa.Schema, got: Sequence[str], what: str = "columns") -> None:
    expected = set(schema.names)
    missing = [n for n in schema.names if n not in set(got)]
    extra = sorted(set(got) - expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"extra {extra}")
        raise ValueError(f"table {table!r}: {what} do not match the schema: {'; '.join(parts)}")


def make_table(name: str, rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]], *,
               compact: bool = True) -> pa.Table:
    """Build table `name` from row dicts or a column dict (lists, or Arrow arrays such as those of
    study.runtime.columns), with exactly the declared columns, order and types: in the compact form (repeated
    strings dictionary-encoded, how results are held in memory) unless `compact` is False.

    ValueError (naming the table and the columns) for missing or extra columns, values of the wrong kind,
    lossy casts, or nulls in non-nullable columns. An empty row list gives an empty table.
    """
    declared = schema_for(name)
    schema = compact_schema(declared) if compact else declared
    if isinstance(rows, Mapping):
        columns: Mapping[str, Any] = rows
        _check_columns(name, schema, list(columns))
    else:
        rows = list(rows)
        for i, row in enumerate(rows):
            _check_columns(name, schema, list(row), what=f"keys of row {i}")
        columns = {n: [row[n] for row in rows] for n in schema.names}
    arrays = [_column(name, field, columns[field.name]) for field in schema]
    lengths = {field.name: len(a) for field, a in zip(schema, arrays)}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"table {name!r}: columns have different lengths: {lengths}")
    return pa.Table.from_arrays(arrays, schema=schema)
