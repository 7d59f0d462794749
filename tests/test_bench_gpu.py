"""benchmarks/bench_gpu.py, the GPU table of gpu_check.sh, run here on a tiny model on the CPU:
the same code path a GPU run takes, so that the GPU minutes go to measuring."""
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_gpu  # noqa: E402


def test_the_bound_counts_every_matrix_a_step_reads(torch):
    """The decode bound's weight count: every parameter of transformers' Gemma but the norms
    (the LM head is the tied embedding, read once per step)."""
    transformers = pytest.importorskip("transformers")
    for cfg in (bench_gpu.TINY, bench_gpu.GEMMA_2B):
        with torch.device("meta"):
            model = transformers.GemmaForCausalLM(transformers.GemmaConfig(**cfg))
        matrices = sum(p.numel() for n, p in model.named_parameters() if not n.endswith("norm.weight"))
        assert bench_gpu.matrix_weights(cfg) == matrices
    # Gemma-2B has 2,506,172,416 parameters, 37 of them norms of 2048 (two a layer, the final one).
    assert bench_gpu.matrix_weights(bench_gpu.GEMMA_2B) == 2_506_172_416 - 37 * 2048


def test_the_script_runs_on_a_tiny_model_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert bench_gpu.main(["--tiny", "--device", "cpu", "--new", "4", "--reps", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["measured_tbs"] > 0  # the bandwidth is measured in the same run
    rows = result["rows"]
    assert [(r["engine"], r["fmt"]) for r in rows] == [("transformers eager", "bfloat16")] + [
        ("gemma_cpp (cpu)", f) for f in ("bfloat16", "int8", "int4")]
    for r in rows:
        for k in ("decode_b1_tok_s", "decode_b8_tok_s", "prefill_tok_s"):
            assert np.isfinite(r[k]) and r[k] > 0, (r["engine"], r["fmt"], k)
        if r["engine"].startswith("gemma_cpp"):  # its bound: step bytes over the measured bandwidth
            assert r["frac_copy"] == pytest.approx(r["decode_b1_tok_s"] * r["step_bytes"] / (result["measured_tbs"] * 1e12))
    text = capsys.readouterr().out
    assert "target: bf16 decode B=1 >= 5x transformers eager bf16" in text
    assert text.count("gemma_cpp (cpu)") >= 3
