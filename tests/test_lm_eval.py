"""lm-eval, the evaluation harness, against the real server as its docs run it (``--model
local-completions`` with a ``base_url``), nothing configured: it finds its tokenizer on the server
(``/tokenizer_info``, ``/tokenize``: no Hugging Face download), scores multiple-choice answers with
``echo`` and ``logprobs`` and generates answers until its stop strings. Its loglikelihoods equal the
library's own scores of the same tokens, and its generations our greedy answers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import mullama
from mullama import StreamConfig

QUESTIONS = [
    {"question": "The capital of France is", "choices": ["Paris", "Berlin", "a banana"], "answer": 0},
    {"question": "Two plus two equals", "choices": ["four", "seven", "green"], "answer": 0},
    {"question": "The sky on a clear day is", "choices": ["blue", "loud", "square"], "answer": 0},
]
TASKS = {
    "choose": "output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
              "metric_list:\n  - metric: acc\n",
    "complete": "output_type: generate_until\ndoc_to_target: \"{{choices[answer]}}\"\n"
                "generation_kwargs:\n  until: [\"\\n\", \".\"]\n  max_gen_toks: 8\n"
                "metric_list:\n  - metric: exact_match\n",
}


def _run_lm_eval(url: str, tmp_path) -> dict[str, list[dict]]:
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps(question) + "\n" for question in QUESTIONS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, body in TASKS.items():
        (tasks / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\ndoc_to_text: \"{{{{question}}}}\"\n{body}")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
                           f"model=smollm2,base_url={url}/v1/completions", "--tasks", "choose,complete",
                           "--include_path", str(tasks), "--output_path", str(tmp_path / "out"), "--log_samples"],
                          capture_output=True, text=True, env=env, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    samples = {}
    for name in TASKS:
        (path,) = (tmp_path / "out").rglob(f"samples_{name}_*.jsonl")
        samples[name] = [json.loads(line) for line in path.read_text().splitlines()]
    return samples


def test_lm_eval_scores_and_generates_as_the_library_does(served, model, tmp_path):
    samples = _run_lm_eval(served.url, tmp_path)
    with mullama.Context(model, n_ctx=1024) as context:
        for sample in sorted(samples["choose"], key=lambda s: s["doc_id"]):
            question = QUESTIONS[sample["doc_id"]]
            context_ids = model.tokenize(question["question"], add_special=False)
            for choice, response in zip(question["choices"], sample["filtered_resps"]):
                whole = model.tokenize(f"{question['question']} {choice}", add_special=False)
                scored = context.generate(model.detokenize(whole), max_tokens=1, prompt_logprobs=1).prompt_logprobs
                continuation = scored[len(context_ids):]
                assert math.isclose(float(response[0]), sum(t.logprob for t in continuation), abs_tol=1e-3)
                greedy = all(t.top_logprobs[0].id == t.id for t in continuation)
                assert response[1] == str(greedy)
        for sample in sorted(samples["complete"], key=lambda s: s["doc_id"]):
            question = QUESTIONS[sample["doc_id"]]["question"]
            answer = context.generate(question, max_tokens=8, config=StreamConfig(stop_sequences=["\n", "."],
                                                                                   temperature=0))
            assert sample["filtered_resps"][0] == answer.text
