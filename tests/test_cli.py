"""The offline CLI: build and eval on a local tiny model, errors leave no partial file."""

from __future__ import annotations

import json
import subprocess
import sys

from support import FIXTURES, make_tiny

from service.cli import main


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
    capsys.readouterr()
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
