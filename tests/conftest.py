import pytest
import torch

from helpers import corpus, make_tiny_llama, make_tokenizer  # noqa: F401  (re-exported)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """CPU always; CUDA too when present, so the same assertions cover the GPU path."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command loads weights: argument errors must come first."""
    from baq.model import loader

    def boom(*a, **k):
        raise AssertionError("model weights loaded before the arguments were validated")

    monkeypatch.setattr(loader, "load_model", boom)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-block Llama with its tokenizer saved as a local Hugging Face folder."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama().save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path
