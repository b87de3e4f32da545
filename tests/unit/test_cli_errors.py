"""Bad input: one clear line on stderr, exit code 2, nothing written, no model loaded."""

import subprocess
import sys

import pytest

from study.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


CASES = [
    (["ships", "--model", "no-such-model"], "no-such-model"),
    (["ships", "--model", "smollm2-135m-saf"], "smollm2-135m-instruct, smollm2-135m-safe"),  # lists them
    (["ships", "--prompts", "missing.csv"], "missing.csv"),
    (["ships", "--prompts", "nonsense-set"], "nonsense-set"),
    (["ships", "--op", "zero_q"], "zero_q"),
    (["ships", "--eps", "1.5"], "1.5"),
    (["ships", "--eps", "0"], "eps"),
    (["ships", "--format", "fancy"], "fancy"),
    (["ships", "--dtype", "float8"], "float8"),
    (["ships", "--device", "tpu"], "tpu"),
    (["ships", "--limit", "0"], "limit"),
    (["ships", "--executor", "dask"], "dask"),
    (["sahara", "--subspace", "middle"], "middle"),
    (["sahara", "--steps", "0"], "steps"),
    (["surgery", "--heads", "L2X26"], "L2X26"),
    (["surgery", "--heads", "L30H0"], "out of range"),  # checked against the config: no weights load
    (["ships", "--model", "no-org/no-model"], "not in the local Hugging Face cache"),  # offline: at once
]


@pytest.mark.parametrize("argv,needle", [(["ships", "--no-such-option", "x"], "--no-such-option"),
                                         (["sahara", "--steps", "two"], "two"), (["ships"], "--out"),
                                         (["nosuch"], "nosuch"), ([], "command")])
def test_argparse_errors_are_one_line_too(argv, needle, tmp_path, capsys):
    out = ["--out", str(tmp_path / "out")] if argv[:1] in (["ships"], ["sahara"]) and len(argv) > 1 else []
    with pytest.raises(SystemExit) as exit_:
        main([*argv, *out])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and needle in err and "--help" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,needle", CASES)
def test_bad_input_one_line_exit_2_nothing_written(argv, needle, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _run(capsys, *argv, "--out", str(out))
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert needle in err
    assert not out.exists()


def test_missing_column_and_empty_set(tmp_path, capsys):
    csv = tmp_path / "p.csv"
    csv.write_text("goal,target\nhow to x,sure\n")
    code, err = _run(capsys, "ships", "--prompts", f"{csv}:nope", "--out", str(tmp_path / "o"))
    assert code == 2 and "nope" in err and "goal" in err
    empty = tmp_path / "e.txt"
    empty.write_text("\n\n")
    code, err = _run(capsys, "ships", "--prompts", str(empty), "--out", str(tmp_path / "o"))
    assert code == 2 and "e.txt" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_bad_config_key(tmp_path, capsys):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("ships:\n  limt: 3\n")
    code, err = _run(capsys, "run", str(cfg), "--out", str(tmp_path / "o"))
    assert code == 2 and "limt" in err and "limit" in err
    code, err = _run(capsys, "run", str(tmp_path / "none.yaml"))
    assert code == 2 and "none.yaml" in err


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "study.cli", "ships", "--op", "bogus", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("headstudy: error:") and "bogus" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_out_that_is_a_file_fails_before_any_work(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("x")
    code, err = _run(capsys, "ships", "--out", str(target))
    assert code == 2 and "not a folder" in err and target.read_text() == "x"


def test_version_and_help_examples(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("headstudy ")
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and "headstudy run" in text


def test_vllm_backend_refuses_a_family_it_cannot_ablate_before_any_work(tmp_path, capsys):
    """A q-norm family (Qwen3) under `--backend vllm`: vLLM's head edits would be undone by the norm. Refused
    from the model's config alone, before an engine (or the model) loads; the hf backend takes the same model."""
    import importlib.util

    from transformers import Qwen3Config

    from study.generation.backends import VLLM_MODEL_TYPES, check_vllm_model
    from study.models.loading import model_shape

    folder = tmp_path / "qwen3-config-only"
    Qwen3Config(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(folder)
    assert model_shape(str(folder)).model_type == "qwen3" and "qwen3" not in VLLM_MODEL_TYPES
    out = tmp_path / "out"
    code, err = _run(capsys, "asr", "--model", str(folder), "--heads", "L0H0", "--backend", "vllm",
                     "--executor", "local", "--out", str(out))
    assert code == 2 and len(err.splitlines()) == 1 and not out.exists()
    if importlib.util.find_spec("vllm") is None:
        assert "needs vLLM" in err
    else:
        assert "cannot ablate heads" in err and "'qwen3'" in err and "--backend hf" in err
        check_vllm_model("smollm2-135m-instruct", model_shape("smollm2-135m-instruct"))  # llama: accepted


def test_vllm_model_types_are_the_vllm_edit_table():
    """`study` names the model types vLLM can edit as data (it never imports actors); they are that table's keys."""
    from actors.vllm_ext import VLLM_ARCHITECTURES
    from study.generation.backends import VLLM_MODEL_TYPES

    assert sorted(VLLM_ARCHITECTURES) == sorted(VLLM_MODEL_TYPES)


@pytest.mark.parametrize("config", [
    {"model_type": "mixtral", "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
     "hidden_size": 32, "num_local_experts": 4},
    {"model_type": "falcon", "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 32},
])
def test_an_uncovered_architecture_is_one_line_at_plan_time(config, tmp_path, capsys):
    """Read from config.json alone: there are no weights in the folder, so nothing could have been loaded."""
    import json

    folder = tmp_path / config["model_type"]
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    code, err = _run(capsys, "ships", "--model", str(folder), "--executor", "local", "--out", str(out))
    assert code == 2 and len(err.splitlines()) == 1
    assert f"unsupported architecture {config['model_type']!r}" in err and "llama" in err and str(folder) in err
    assert not out.exists()


def test_a_run_that_could_not_finish_is_one_line_and_exit_1(monkeypatch, capsys):
    import study.cli as cli
    from study.core.errors import RunFailed

    def fails(args):
        raise RunFailed("model m could not be loaded: SafetensorError: header too short (3 tries); the other "
                        "models' tables are in out")

    monkeypatch.setitem(cli.COMMANDS, "run", fails)
    code, err = _run(capsys, "run")
    assert code == 1 and len(err.splitlines()) == 1 and "model m could not be loaded" in err


def test_lm_eval_tasks_without_lm_eval_are_refused_at_plan_time(monkeypatch, tmp_path, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else find_spec(name, *a))
    spec = tmp_path / "study.yaml"
    out = tmp_path / "out"
    spec.write_text(f"out: {out}\nutility: {{heads: L0H0, lm_eval_tasks: [boolq, rte]}}\n")
    code, err = _run(capsys, "run", str(spec), "--executor", "local")
    assert code == 2 and len(err.splitlines()) == 1
    assert "lm_eval_tasks boolq, rte need lm-eval" in err and "headstudy[lm-eval]" in err
    assert not out.exists()
