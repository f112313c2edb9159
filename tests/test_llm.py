"""examples/llm: the Llama decoder sharded over 2 and 4 real ranks against one process (logits
and greedy tokens), plain and quantized by MLX (affine 4-bit, mxfp4), the generate.py command
end to end, and, where mlx-lm is installed, against mlx-lm's own Llama on the same weights."""

import functools
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jax_mlxdist.testing import launch, run_ranks

HERE = pathlib.Path(__file__).parent.parent / "examples" / "llm"
PROMPT = [3, 17, 42, 9, 100, 7, 250, 31]
STEPS = 5  # decode steps after the prefill whose logits are compared
# Largest |logit difference| / largest |logit|, for float32 models: the sharded sums add
# partial products in another order than one process (and than MLX) does; measured 8e-7 to
# 1.3e-6 on 2 and 4 ranks and against mlx-lm.
TOLERANCE = 1e-5
# Tiny, but every rank count divides the heads (8 query, 4 key/value: grouped-query) and each
# rank's columns of o/down hold whole quantization groups at 4 ranks.
SHAPE = ["--hidden", "256", "--layers", "2", "--heads", "8", "--kv-heads", "4", "--intermediate", "512",
         "--vocab", "384"]
MODELS = {  # name: make_model.py flags
    "plain": ["--no-tie", "--rope-traditional", "--rope-theta", "500000"],  # separate lm_head
    "affine4": ["--quantize", "affine", "--bits", "4", "--group-size", "64"],  # tied, quantized embedding
    "mxfp4": ["--quantize", "mxfp4", "--head-dim", "64", "--rope-scaling",  # Llama 3's rope scaling
              '{"rope_type": "llama3", "factor": 8, "original_max_position_embeddings": 16}'],
}


def has_mlx() -> bool:
    try:
        import mlx.core  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The models this machine can make: plain always, quantized ones where MLX quantizes."""
    root = tmp_path_factory.mktemp("llm")
    made = {}
    for name, flags in MODELS.items():
        if "--quantize" in flags and not has_mlx():
            continue
        out = subprocess.run([sys.executable, str(HERE / "make_model.py"), str(root / name), *SHAPE, *flags],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        made[name] = str(root / name)
    return made


def body(here: str, models: dict, prompt: list, steps: int):
    """On every rank: each model's logits (prefill + decode steps) and greedy tokens."""
    sys.path.insert(0, here)
    import generate
    import load
    out = {}
    for name, path in models.items():
        c, params = load.load(path)
        logits = np.asarray(generate.logits_of(c, params, prompt, steps))
        tokens, _, _ = generate.generate(c, params, prompt, 12)
        out[name] = (logits, tokens)
    return out


@pytest.fixture(scope="module")
def ranks(models):
    """results(n): every rank's output of body on n ranks, computed once per n."""
    @functools.cache
    def results(n):
        return run_ranks(body, n, args=(str(HERE), models, PROMPT, STEPS), timeout=240)
    return results


def gap(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def need(name: str) -> None:
    if "--quantize" in MODELS[name]:
        pytest.importorskip("mlx.core", reason="quantized test models are quantized and saved by MLX")


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("n", [2, 4])
def test_sharded_logits_and_tokens_match_one_process(models, ranks, n, name):
    need(name)
    want_logits, want_tokens = ranks(1)[0][name]
    sharded = ranks(n)
    for r, out in enumerate(sharded):
        logits, tokens = out[name]
        assert logits.shape == (len(PROMPT) + STEPS, 384)
        assert gap(logits, want_logits) <= TOLERANCE, (r, gap(logits, want_logits))
        assert tokens == want_tokens, (r, tokens, want_tokens)
        # Every rank holds the same logits, bit for bit (the all_sums give every rank the same bits).
        assert np.array_equal(logits, sharded[0][name][0]), r


def test_generate_command_prints_the_single_process_tokens(models, ranks):
    (single,) = ranks(1)
    out = launch(HERE / "generate.py", 2, "--model", models["plain"], "--prompt-tokens", *map(str, PROMPT),
                 "--max-tokens", "12")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"[rank 0] tokens: {' '.join(map(str, single['plain'][1]))}" in out.stdout, out.stdout
    assert "[rank 0] 2 ranks: prefill 8 tokens at" in out.stdout and "decode 12 tokens at" in out.stdout, out.stdout
    assert "[rank 1]" not in out.stdout  # printed once


def test_text_prompt_goes_through_the_tokenizer(models, tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="--prompt needs the tokenizers package")
    import shutil
    shutil.copytree(models["plain"], tmp_path / "m")
    words = {f"w{i}": i for i in range(384)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "m" / "tokenizer.json"))
    out = launch(HERE / "generate.py", 1, "--model", str(tmp_path / "m"), "--prompt", "w3 w17 w42",
                 "--max-tokens", "4")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "text: 'w" in out.stdout, out.stdout


def mlx_lm_logits(path: str, prompt: list, steps: int) -> np.ndarray:
    """mlx-lm's own Llama (its loader, its KV cache) on the same checkpoint, greedy as ours."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model
    model, _ = load_model(pathlib.Path(path))
    cache = make_prompt_cache(model)
    rows = [model(mx.array(prompt)[None], cache=cache)[0]]
    for _ in range(steps):
        rows.append(model(mx.argmax(rows[-1][-1]).reshape(1, 1), cache=cache)[0])
    return np.array(mx.concatenate(rows).astype(mx.float32))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("n", [1, 2])
def test_logits_match_mlx_lm(models, ranks, n, name):
    pytest.importorskip("mlx.core", reason="mlx-lm runs on MLX")
    pytest.importorskip("mlx_lm", reason="compares with mlx-lm's own model: pip install mlx-lm")
    want = mlx_lm_logits(models[name], PROMPT, STEPS)
    ours = ranks(n)[0][name][0]
    assert gap(ours, want) <= TOLERANCE, gap(ours, want)
    assert np.array_equal(ours.argmax(-1), want.argmax(-1))


def load_only(here: str, path: str):
    sys.path.insert(0, here)
    import load
    load.load(path)


def test_ranks_must_divide_the_key_value_heads(models):
    with pytest.raises(AssertionError, match="3 ranks must divide the 4 key/value heads"):
        run_ranks(load_only, 3, args=(str(HERE), models["plain"]), timeout=120)
