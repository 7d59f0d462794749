"""Our thread pool beside torch's OpenMP runtime, across fork, and with set_num_threads."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import gemma_cpp
from conftest import random_batch

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    order = sys.argv[1]
    if order == "torch-first":
        import torch
        torch.ones(256, 256) @ torch.ones(256, 256)  # start torch's OpenMP pool
    import gemma_cpp
    if order == "torch-after":
        import torch
        torch.ones(256, 256) @ torch.ones(256, 256)
    m = gemma_cpp.GemmaForCausalLM.from_pretrained(sys.argv[2])
    ids = [[5, 17, 300, 41, 7, 9, 800, 12]]
    parent = m(ids).logits
    # A forked child runs the engine after the parent's pool exists: it must not hang,
    # and must compute the same numbers.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        child = m(ids).logits
        os.write(w, json.dumps(float(abs(child - parent).max())).encode())
        os._exit(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    diff = json.loads(os.read(r, 100).decode())
    print(json.dumps(dict(status=status, diff=diff, value=float(parent.sum()))))
""")


@pytest.mark.parametrize("order", ["torch-first", "torch-after", "no-torch"])
def test_torch_before_after_and_fork(tiny, order):
    folder, _ = tiny("GemmaForCausalLM", "gqa")
    out = subprocess.run([sys.executable, "-c", SCRIPT, order, folder], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["status"] == 0 and res["diff"] == 0.0


def test_results_do_not_depend_on_the_thread_count(tiny):
    folder, ref = tiny("GemmaForCausalLM", "mha")
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder)
    ids, mask = random_batch(30, 2, 20, ref.config.vocab_size, pad_left=[0, 6])
    old = gemma_cpp.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            gemma_cpp.set_num_threads(n)
            assert gemma_cpp.get_num_threads() == n
            outs.append(model(ids, attention_mask=mask).logits)
    finally:
        gemma_cpp.set_num_threads(old)
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


def test_engine_calls_from_two_python_threads(tiny):
    import threading

    folder, ref = tiny("GemmaForCausalLM", "mqa")
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder)
    ids, _ = random_batch(31, 1, 12, ref.config.vocab_size)
    expect = model(ids).logits
    results, errors = [], []

    def work():
        try:
            for _ in range(5):
                results.append(model(ids).logits)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(results) == 15
    for r in results:
        np.testing.assert_array_equal(r, expect)


def test_eight_threads_share_models_and_a_tokenizer(tiny):
    """One causal LM (forward, greedy and seeded sampling generate), one sequence- and one
    token-classification model, and one tokenizer, used by 8 Python threads at once in
    different orders: every result equals the one computed alone beforehand. (The engine
    runs one call of a model at a time and releases the GIL while it does; the tokenizer
    keeps no state between calls.)"""
    import threading

    from gemma_cpp._demo import demo_model_path

    folder, ref = tiny("GemmaForCausalLM", "gqa")
    lm = gemma_cpp.GemmaForCausalLM.from_pretrained(folder)
    seq = gemma_cpp.GemmaForSequenceClassification.from_pretrained(
        tiny("GemmaForSequenceClassification", "gqa", num_labels=3)[0])
    tag = gemma_cpp.GemmaForTokenClassification.from_pretrained(
        tiny("GemmaForTokenClassification", "mha", num_labels=5)[0])
    try:
        tok = gemma_cpp.GemmaTokenizer.from_pretrained(demo_model_path())
    except Exception:  # pragma: no cover - the demo package is part of the test extra
        tok = None
    ids, mask = random_batch(40, 2, 14, ref.config.vocab_size, pad_left=[0, 3])
    texts = ["Threads share one model.", "Ünïcödé and emoji 🦀 in the mix", "def f(x):\n    return x * 2"]
    jobs = {
        "forward": lambda: lm(ids, attention_mask=mask).logits,
        "greedy": lambda: np.asarray(lm.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)),
        "sampled": lambda: np.asarray(lm.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True,
                                                  temperature=0.9, top_k=20, seed=7)),
        "seq": lambda: seq(ids, attention_mask=mask).logits,
        "tag": lambda: tag(ids, attention_mask=mask).logits,
    }
    if tok is not None:
        jobs["tokenizer"] = lambda: [tok.decode(tok(t)["input_ids"], skip_special_tokens=True) for t in texts]
    expect = {name: f() for name, f in jobs.items()}
    if tok is not None:
        assert expect["tokenizer"] == texts
    names = list(jobs)
    results, errors = [], []

    def work(k):
        try:
            for j in range(3 * len(names)):
                name = names[(k + j) % len(names)]
                results.append((name, jobs[name]()))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    assert len(results) == 8 * 3 * len(names)
    for name, r in results:
        if name == "tokenizer":
            assert r == expect[name]
        else:
            np.testing.assert_array_equal(r, expect[name], err_msg=name)


def test_a_forked_child_loads_and_runs_its_own_model(tiny):
    """After the parent has run a model (its thread pool exists), a forked child loads a model
    of its own from the folder and computes the parent's numbers."""
    folder, _ = tiny("GemmaForCausalLM", "gqa")
    script = textwrap.dedent("""
        import json, os, sys
        import numpy as np
        import gemma_cpp
        ids = [[5, 17, 300, 41, 7, 9, 800, 12]]
        parent = gemma_cpp.GemmaForCausalLM.from_pretrained(sys.argv[1])(ids).logits
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            m = gemma_cpp.GemmaForCausalLM.from_pretrained(sys.argv[1])
            child = m(ids).logits
            out = m.generate(ids, max_new_tokens=4, do_sample=False)
            os.write(w, json.dumps([float(abs(child - parent).max()), int(out.shape[1])]).encode())
            os._exit(0)
        os.close(w)
        _, status = os.waitpid(pid, 0)
        print(json.dumps(dict(status=status, child=json.loads(os.read(r, 200).decode()))))
    """)
    out = subprocess.run([sys.executable, "-c", script, folder], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["status"] == 0 and res["child"] == [0.0, 12]
