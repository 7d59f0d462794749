"""engine/scheduler.h's plan of one iteration (plan_iteration), a plain function: which
sequences decode, which prompt chunk runs, and who draws a token, against plans derived by
hand from the rule its header states. The running scheduler (test_engine.py,
test_batch_invariance.py) executes these plans."""
import pytest

from gemma_cpp._C import _testing

plan = _testing.plan_iteration


def test_nothing_admitted_plans_nothing():
    p = plan([], 4)
    assert p["dec_rows"] == [] and p["pre_rows"] == [] and p["T"] == 0 and p["chunk"] is None
    assert p["drawn"] == [] and p["drawn_at"] == []


def test_generating_sequences_decode_in_order_then_the_first_prompt_chunk():
    # (row, cached, prompt_len): three generating, then two with prompt left; chunk 4.
    seqs = [(2, 10, 5), (0, 7, 7), (3, 0, 10), (1, 12, 3), (4, 0, 6)]
    p = plan(seqs, 4)
    assert p["decoding"] == [0, 1, 3]
    assert p["dec_rows"] == [2, 0, 1] and p["dec_slots"] == [10, 7, 12]  # each at its own next slot
    # Only the first waiting prompt runs, its first window [0, 4).
    assert p["chunk"] == (2, 0, 4) and p["pre_rows"] == [3] and p["slot0"] == 0 and p["T"] == 4
    # The chunk does not end its prompt: only the generating sequences draw, at tokens 0..2.
    assert p["drawn"] == [0, 1, 3] and p["drawn_at"] == [0, 1, 2]


@pytest.mark.parametrize("cached, prompt_len, chunk, expected", [
    (6, 20, 4, (6, 8)),     # a prompt resumed mid-window (a reused prefix) runs to the window's end
    (8, 10, 4, (8, 10)),    # the last, partial window
    (0, 3, 8, (0, 3)),      # a prompt shorter than a chunk: one step
    (16, 40, 16, (16, 32)),  # the second window of a long prompt
])
def test_a_chunk_is_its_chunk_aligned_window(cached, prompt_len, chunk, expected):
    p = plan([(5, cached, prompt_len)], chunk)
    begin, end = expected
    assert p["chunk"] == (0, begin, end)
    assert p["pre_rows"] == [5] and p["slot0"] == begin and p["T"] == end - begin
    ends_prompt = end == prompt_len
    assert p["drawn"] == ([0] if ends_prompt else []) and p["drawn_at"] == ([end - begin - 1] if ends_prompt else [])


def test_the_chunk_that_ends_a_prompt_draws_after_the_decoders():
    p = plan([(0, 9, 4), (1, 8, 11)], 4)  # one decoding; the other's last window [8, 11)
    assert p["dec_rows"] == [0] and p["pre_rows"] == [1] and p["T"] == 3
    # Tokens: 0 the decoder's, 1..3 the chunk's; the chunk's last (3) gives its first new token.
    assert p["drawn"] == [0, 1] and p["drawn_at"] == [0, 3]


def test_a_one_token_chunk_is_decode_work():
    # Prompt 13, 12 cached (a reused prefix of three chunks of 4): one token left. As
    # Model::prompt_rows has it, one token of a row is decode work (the decode kernels).
    p = plan([(0, 5, 2), (7, 12, 13)], 4)
    assert p["dec_rows"] == [0, 7] and p["dec_slots"] == [5, 12]
    assert p["pre_rows"] == [] and p["T"] == 0
    assert p["chunk"] == (1, 12, 13) and p["drawn"] == [0, 1] and p["drawn_at"] == [0, 1]


def test_bad_sequences_are_refused():
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        plan([(0, 0, 4)], 0)
    with pytest.raises(ValueError, match="prompt_len >= 1"):
        plan([(0, 0, 0)], 4)
