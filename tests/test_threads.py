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
