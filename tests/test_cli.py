"""The offline CLI: build and eval on a local tiny model, errors leave no partial file."""

from __future__ import annotations

import json
import subprocess
import sys

from support import FIXTURES, make_tiny

from service.cli import METHOD_HELP, main


def _tiny_dir(tmp_path):
    lm = make_tiny("llama")
    lm.model.save_pretrained(tmp_path / "tiny")
    lm.tokenizer.save_pretrained(tmp_path / "tiny")
    return str(tmp_path / "tiny")


def test_build_then_eval_json(tmp_path, capsys):
    model = _tiny_dir(tmp_path)
    data = str(FIXTURES / "opinions_group_urban.jsonl")
    out = tmp_path / "p.safetensors"
    assert main(["build", "--method", "diffmean", "--data", data, "--limit", "12", "--model", model,
                 "--out", str(out)]) == 0
    assert out.exists()
    printed = capsys.readouterr().out
    assert "gain in alignment: " in printed and " ± " in printed, printed  # never a gain without its error
    assert main(["eval", "--profile", str(out), "--data", data, "--offset", "12", "--limit", "5",
                 "--model", model, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["summary"]) == {"unsteered", "steered"}
    assert len(report["items"]) == 5
    first = report["items"][0]
    assert {"id", "target", "unsteered", "steered"} <= set(first)
    assert abs(sum(first["steered"]) - 1) < 1e-4
    assert main(["eval", "--profile", str(out), "--profile", str(out), "--data", data, "--limit", "3",
                 "--model", model]) == 0
    assert "alignment" in capsys.readouterr().out


def test_bad_input_leaves_no_output_file(tmp_path, capsys):
    model = _tiny_dir(tmp_path)
    out = tmp_path / "p.safetensors"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q", "options": ["a", "b"], "target": [0.3, 0.3]}\n')
    assert main(["build", "--method", "diffmean", "--data", str(bad), "--model", model, "--out", str(out)]) == 2
    assert "bad.jsonl[0].target" in capsys.readouterr().err
    assert main(["build", "--method", "diffmean", "--data", str(FIXTURES / "user_answers.jsonl"),
                 "--model", model, "--layer", "40", "--out", str(out)]) == 2
    assert "layer" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".p.safetensors*"))


def test_eval_refuses_a_profile_for_another_model(tmp_path, capsys):
    model = _tiny_dir(tmp_path)
    out = tmp_path / "p.safetensors"
    data = str(FIXTURES / "user_answers.jsonl")
    main(["build", "--method", "diffmean", "--data", data, "--model", model, "--layer", "1", "--strength", "1",
          "--out", str(out)])
    other = make_tiny("llama", seed=7)
    other.model.save_pretrained(tmp_path / "other")
    other.tokenizer.save_pretrained(tmp_path / "other")
    assert main(["eval", "--profile", str(out), "--data", data, "--model", str(tmp_path / "other")]) == 2
    assert "built for model" in capsys.readouterr().err


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "service.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "build" in result.stdout and "up" in result.stdout


# A fresh interpreter runs the command line and reports which heavy packages it loaded.
_PROBE = """
import sys
from service.cli import METHOD_HELP, main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("torch", "transformers", "flask", "celery", "sqlalchemy", "numpy") if m in sys.modules)
print("HEAVY", heavy, file=sys.stderr)
sys.exit(code)
"""


def _probe(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=120)


def test_help_and_input_errors_answer_without_loading_the_heavy_packages(tmp_path):
    for argv in (["--help"], ["build", "--help"], ["up", "--help"], ["eval", "--help"]):
        result = _probe(*argv)
        assert result.returncode == 0, result.stderr
        assert "HEAVY []" in result.stderr, (argv, result.stderr)
    build_help = " ".join(_probe("build", "--help").stdout.split())  # argparse wraps to the terminal
    for name in METHOD_HELP:
        assert name in build_help
    assert "--positions" in build_help and "last = the last prompt token" in build_help
    assert "smollm2-135m-instruct" in build_help  # the default model is named

    missing = _probe("build", "--method", "diffmean", "--data", str(tmp_path / "none.jsonl"),
                     "--out", str(tmp_path / "p.safetensors"))
    assert missing.returncode == 2 and "none.jsonl" in missing.stderr and "HEAVY []" in missing.stderr
    wrong = _probe("build", "--method", "cold-steer", "--data", "x", "--out", "y")
    assert wrong.returncode == 2 and "invalid choice" in wrong.stderr and "HEAVY []" in wrong.stderr


def test_every_registered_method_is_documented_in_the_help():
    from steer_core.methods import METHODS

    assert set(METHOD_HELP) == set(METHODS)
