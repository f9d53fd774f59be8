"""The offline CLI: build and eval on a local tiny model, errors leave no partial file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support import FIXTURES, make_tiny

from service.cli.main import METHOD_HELP, main
from steer_core.profile import Profile


def _tiny_dir(tmp_path):
    lm = make_tiny("llama")
    lm.model.save_pretrained(tmp_path / "tiny")
    lm.tokenizer.save_pretrained(tmp_path / "tiny")
    return str(tmp_path / "tiny")


def test_build_then_eval_the_cross_table(tmp_path, capsys):
    model = _tiny_dir(tmp_path)
    urban, rural = str(FIXTURES / "opinions_group_urban.jsonl"), str(FIXTURES / "opinions_group_rural.jsonl")
    out = tmp_path / "p.safetensors"
    assert main(["build", "--method", "diffmean", "--data", urban, "--limit", "12", "--model", model,
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.exists() and "calibration" in printed
    assert "gain in alignment: " in printed and " ± " in printed, printed  # never a gain without its error
    assert "question lean not considered: a question lean is considered from 100 items" in printed, printed
    assert "verdict: serves " in printed and "what chat gets" in printed, printed
    common = ["--data", urban, "--data", rural, "--offset", "12", "--limit", "5", "--model", model]
    assert main(["eval", "--profile", f"{out}@opinions_group_urban", "--profile", str(out), *common, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["groups"] == ["opinions_group_urban", "opinions_group_rural"] and report["questions"] == 5
    assert set(report["cells"]["both orders"]) == {"unsteered", "uniform", "calibrated", "p", "p#2"}
    cell = report["cells"]["reversed"]["p"]["opinions_group_rural"]
    assert {"alignment", "gain_vs_unsteered", "gain_vs_uniform", "gain_vs_calibrated"} == set(cell)
    assert set(report["specificity"]["original"]) == {"p"}  # only the profile said to be built for a group
    assert report["profiles"]["p"]["own_group"] == "opinions_group_urban"
    assert report["profiles"]["p"]["calibration"] == report["profiles"]["p#2"]["calibration"]
    # Debiased reads (the default): both orders are read and averaged, so the two orders score the same.
    assert report["debiased"] and report["cells"]["original"] == report["cells"]["reversed"]
    assert main(["eval", "--profile", f"{out}@opinions_group_urban", *common]) == 0
    text = capsys.readouterr().out
    assert "specificity of p" in text and "calibrated" in text and "debiased reads" in text
    assert main(["eval", "--profile", f"{out}@opinions_group_urban", *common, "--single-order", "--json"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert not single["debiased"] and single["cells"]["original"] != single["cells"]["reversed"]
    assert main(["eval", "--profile", f"{out}@nobody", *common]) == 2
    assert "'nobody' is not one of the targets" in capsys.readouterr().err
    assert main(["eval", "--data", urban, "--limit", "3", "--model", model]) == 2
    assert "too few" in capsys.readouterr().err


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



def test_build_with_a_contrast_group_chooses_by_specificity(tmp_path, capsys):
    """`--contrast FILE`: the other group's answers to the same questions (matched by text and options, as the
    service's contrast is) ride on the sample, so the build tells the group apart from them."""
    model = _tiny_dir(tmp_path)
    urban, rural = str(FIXTURES / "opinions_group_urban.jsonl"), str(FIXTURES / "opinions_group_rural.jsonl")
    out = tmp_path / "c.safetensors"
    assert main(["build", "--method", "diffmean", "--data", urban, "--limit", "12", "--contrast", rural,
                 "--model", model, "--out", str(out)]) == 0
    assert "specificity" in Profile.load(out).metrics["selection"]
    capsys.readouterr()
    unrelated = tmp_path / "unrelated.jsonl"
    unrelated.write_text('{"question": "Tea or coffee?", "options": ["Tea", "Coffee"], "answer": 0}\n')
    none = tmp_path / "none.safetensors"
    assert main(["build", "--method", "diffmean", "--data", urban, "--limit", "12", "--contrast", str(unrelated),
                 "--model", model, "--out", str(none)]) == 2
    assert "answers none of the sample's questions" in capsys.readouterr().err and not none.exists()

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

import pytest
from service.cli.main import METHOD_HELP, main
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


def test_population_build_questions_fit_then_eval(tmp_path, capsys):
    model = _tiny_dir(tmp_path)
    urban, rural = str(FIXTURES / "opinions_group_urban.jsonl"), str(FIXTURES / "opinions_group_rural.jsonl")
    mixed = tmp_path / "suburban.jsonl"  # a third group halfway between the two, on the same questions
    with open(urban) as u, open(rural) as r, open(mixed, "w") as out:
        for a, b in zip(u, r, strict=True):
            x, y = json.loads(a), json.loads(b)
            out.write(json.dumps({**x, "target": [(p + q) / 2 for p, q in zip(x["target"], y["target"], strict=True)]})
                      + "\n")
    population = tmp_path / "towns.population"
    assert main(["population", "build", "--data", urban, "--data", rural, "--data", str(mixed), "--limit", "16",
                 "--model", model, "--out", str(population)]) == 0
    printed = capsys.readouterr().out
    assert population.exists() and "population of 3 groups x 16 shared questions" in printed, printed
    assert "strength" in printed and " ± " in printed
    assert main(["population", "questions", "--population", str(population), "--data", urban, "--limit", "16",
                 "-k", "3", "--model", model]) == 0
    ranked = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [line.split(".")[0].strip() for line in ranked] == ["1", "2", "3"]
    profile = tmp_path / "newcomer.safetensors"
    assert main(["population", "fit", "--population", str(population), "--data", urban, "--offset", "16",
                 "--limit", "8", "--model", model, "--out", str(profile)]) == 0
    printed = capsys.readouterr().out
    assert "fitted from 8 answers" in printed and "weights:" in printed, printed
    fitted = Profile.load(profile)
    assert fitted.method == "diffmean" and fitted.question_lean is not None
    assert sum(fitted.metrics["population"]["weights"].values()) == pytest.approx(1.0)
    # What `pluristeer eval` reports beside the baselines, like any profile.
    assert main(["eval", "--profile", f"{profile}@opinions_group_urban", "--data", urban, "--data", rural,
                 "--offset", "24", "--limit", "6", "--model", model, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["cells"]["both orders"]) == {"unsteered", "uniform", "calibrated", "newcomer"}
    # A population file that is not one is refused, naming it, and writes nothing.
    bad = tmp_path / "not-a-population"
    bad.write_bytes(b"nope")
    assert main(["population", "fit", "--population", str(bad), "--data", urban, "--limit", "4",
                 "--model", model, "--out", str(tmp_path / "none.safetensors")]) != 0
    assert "population" in capsys.readouterr().err and not (tmp_path / "none.safetensors").exists()
