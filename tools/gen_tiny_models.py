#!/usr/bin/env python3
"""Tiny reference models and tokenizers for stowage's CPU execution tests.

Everything here is produced by the real Hugging Face libraries (transformers' own model
classes and save_pretrained, the `tokenizers` package's BPE trainer), with fixed seeds, so
the C++ forward pass and tokenizer are checked against them, never against themselves.

Outputs (all committed):
  tests/fixtures/tiny/models/<name>/{config.json,model.safetensors}   four random models
  tests/fixtures/tiny/<name>.json          prompts, fp32 logits, bf16-weight logits, greedy ids
  tests/fixtures/tiny/tokenizers/<style>.json   byte-level BPE tokenizer.json per pre-tokenizer
  tests/fixtures/tiny/tokenizer_cases.json  ~50 strings and the ids Python produces for each
  examples/models/tiny-llama/              a small trained Llama-3-style demo model

Run: /opt/stowage-tools-venv/bin/python tools/gen_tiny_models.py
"""
from __future__ import annotations

import base64
import json
import os
import random
import shutil
import struct
import sys
import time
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
import tokenizers  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "tiny"

torch.set_num_threads(1)


def b64f32(t: torch.Tensor) -> str:
    """float32 little-endian bytes, base64 (row-major)."""
    a = t.detach().to(torch.float32).contiguous().reshape(-1).tolist()
    return base64.b64encode(struct.pack("<%df" % len(a), *a)).decode("ascii")


# ---------------------------------------------------------------------------------------------
# (1) random models
# ---------------------------------------------------------------------------------------------

MODEL_SPECS = {
    # GQA (4 query heads, 2 kv heads), untied embeddings, default rope.
    "llama_gqa": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
             bos_token_id=1, eos_token_id=2),
    ),
    # Llama-3 style: rope_scaling "llama3" with a small original context so all three frequency
    # bands (low, medium, high) occur for head_dim 16; tied embeddings; GQA 8/2.
    "llama3_tied": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(vocab_size=640, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
             rms_norm_eps=1e-5, rope_theta=500000.0,
             rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                               high_freq_factor=4.0, original_max_position_embeddings=32),
             tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    ),
    # Mistral style: GQA, untied, sliding_window larger than any test sequence.
    "mistral": (
        MistralConfig,
        MistralForCausalLM,
        dict(vocab_size=384, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
             num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
             rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096,
             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    ),
    # Qwen2 style: q/k/v bias, tied embeddings, rope_theta 1e6, eps 1e-6.
    "qwen2": (
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(vocab_size=448, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
             rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
             use_sliding_window=False, bos_token_id=1, eos_token_id=2),
    ),
}


def make_model(name: str, seed: int):
    cfg_cls, model_cls, kw = MODEL_SPECS[name]
    torch.manual_seed(seed)
    cfg = cfg_cls(**kw)
    cfg._attn_implementation = "eager"
    model = model_cls(cfg).eval()
    # The default init (std 0.02) gives almost uniform logits; larger weights make the test
    # sensitive (distinct greedy tokens, logits of order 1) and exercise biases and norms.
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif pname.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in pname:
                p.copy_(1.0 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / fan_in**0.5))
    return model


def greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    gen = transformers.GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                        eos_token_id=None, pad_token_id=0, bos_token_id=None)
    with torch.no_grad():
        out = model.generate(ids, generation_config=gen)
    return out[0, ids.shape[1]:].tolist()


def gen_models():
    out_models = FIX / "models"
    for seed, name in enumerate(MODEL_SPECS, start=100):
        model = make_model(name, seed)
        d = out_models / name
        if d.exists():
            shutil.rmtree(d)
        model.save_pretrained(d, safe_serialization=True)
        for extra in ("generation_config.json",):
            if (d / extra).exists():
                (d / extra).unlink()
        vocab = model.config.vocab_size
        rng = random.Random(seed)
        prompt = [rng.randrange(3, vocab) for _ in range(7)]
        batch = [[rng.randrange(3, vocab) for _ in range(5)] for _ in range(2)]
        with torch.no_grad():
            logits_all = model(torch.tensor([prompt])).logits[0]
            batch_logits = model(torch.tensor(batch)).logits[:, -1, :]
            greedy_ids = greedy(model, torch.tensor([prompt]), 32)
            # bf16 weights computed in fp32: round every parameter to bfloat16 and back. The
            # C++ bf16 path (bf16 weights, fp32 activations and accumulation) computes exactly this.
            m16 = make_model(name, seed)
            for p in m16.parameters():
                p.copy_(p.to(torch.bfloat16).to(torch.float32))
            logits_bf16w = m16(torch.tensor([prompt])).logits[0]
            greedy_bf16w = greedy(m16, torch.tensor([prompt]), 32)
        fx = {
            "model": name,
            "model_dir": f"models/{name}",
            "generator": "tools/gen_tiny_models.py",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "vocab_size": vocab,
            "prompt": prompt,
            "logits_all": {"shape": list(logits_all.shape), "f32le_b64": b64f32(logits_all)},
            "logits_all_bf16_weights": {"shape": list(logits_bf16w.shape), "f32le_b64": b64f32(logits_bf16w)},
            "batch_prompts": batch,
            "batch_last_logits": {"shape": list(batch_logits.shape), "f32le_b64": b64f32(batch_logits)},
            "greedy_32": greedy_ids,
            "greedy_32_bf16_weights": greedy_bf16w,
        }
        (FIX / f"{name}.json").write_text(json.dumps(fx, indent=1) + "\n")
        print(name, "params", sum(p.numel() for p in model.parameters()), "greedy", greedy_ids[:8])


# ---------------------------------------------------------------------------------------------
# (2) tokenizers
# ---------------------------------------------------------------------------------------------

TRAIN_TEXT = """\
The quick brown fox jumps over the lazy dog. It's a sunny day, isn't it? We'll see.
I'm sure they've been there; you'd know if they're lying. Don't worry, she'll come back.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 123 2024 31415926 1,000,000 3.14159 -7 +8 1e-5 0x1F.
Café crème brûlée, naïve façade, jalapeño, Zürich, São Paulo, Ærø, Øresund, Łódź, İstanbul.
Ελληνικά γράμματα, русский текст, עברית, العربية, हिन्दी, ไทย, 한국어 텍스트.
日本語のテキストと中文文本，还有一些汉字：你好世界。東京は晴れです。
Emoji: 😀 😃 🎉 🚀 👍🏽 ❤️ 🇯🇵 👨‍👩‍👧 — and symbols © ® ™ € £ ¥ § ¶ • … ← → ≤ ≥ ∞ ∑ √.
Tabs\tand\t\ttabs, lines

with blank lines,   runs   of    spaces,\r\nWindows line ends\r\n and trailing spaces   
def main(argv):\n    return sum(x * 2 for x in range(10))  # code-like text
{"key": "value", "list": [1, 2, 3], "nested": {"a": null}}
HTTP/1.1 200 OK; Content-Length: 1234; user@example.com https://example.org/path?q=1&r=2
MiXeD CaSe WoRdS and ALL CAPS SHOUTING and lower case whispering.
Contractions in caps: IT'S, DON'T, WE'LL, THEY'VE, I'M, YOU'D, WE'RE.
"""


def build_corpus() -> list[str]:
    lines = TRAIN_TEXT.split("\n")
    rng = random.Random(7)
    out = []
    for _ in range(40):
        rng.shuffle(lines)
        out.append("\n".join(lines))
    return out


GPT2_PAT = None  # the ByteLevel pre-tokenizer's built-in regex (use_regex=True)
LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
              r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
             r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

TOKENIZER_STYLES = {
    # style: (pre_tokenizer factory, special tokens, ignore_merges, normalizer, post-processor)
    "gpt2": (lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
             ["<|endoftext|>"], False, None, None),
    "llama3": (lambda: pre_tokenizers.Sequence([
                   pre_tokenizers.Split(Regex(LLAMA3_PAT), behavior="isolated", invert=False),
                   pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)]),
               ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"], True, None, "bos"),
    "qwen2": (lambda: pre_tokenizers.Sequence([
                  pre_tokenizers.Split(Regex(QWEN2_PAT), behavior="isolated", invert=False),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)]),
              ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], False, "nfc", None),
}


def train_tokenizer(style: str, vocab_size: int = 1000) -> Tokenizer:
    pre, specials, ignore_merges, norm, post = TOKENIZER_STYLES[style]
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if norm == "nfc":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(build_corpus(), trainer=trainer)
    if post == "bos":
        bos = specials[0]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


TEST_STRINGS = [
    "Hello world",
    "Hello, world!",
    " leading space",
    "trailing space ",
    "  two leading spaces",
    "multiple   internal    spaces",
    "tabs\tand\t\tmore\ttabs",
    "line one\nline two\n\nline four",
    "windows\r\nline\r\nends",
    "   \n   \n",
    "\n\n\n",
    "It's we're they've I'm you'd he'll she'd",
    "IT'S WE'RE THEY'VE I'M YOU'D HE'LL",
    "don't can't won't shouldn't",
    "'quoted' and \"double quoted\"",
    "12345678901234567890",
    "3.14159 and 2.71828",
    "1,000,000 dollars",
    "phone: +1 (555) 123-4567",
    "Café crème brûlée",
    "naïve façade jalapeño",
    "Zürich São Paulo Łódź",
    "Ελληνικά γράμματα",
    "русский текст",
    "日本語のテキスト",
    "中文文本，你好世界。",
    "한국어 텍스트",
    "हिन्दी ไทย",
    "العربية עברית",
    "emoji 😀 party 🎉 rocket 🚀",
    "👍🏽 skin tone and 👨‍👩‍👧 family",
    "flags 🇯🇵🇫🇷",
    "❤️ heart with variation selector",
    "symbols © ® ™ € £ ¥ § ¶ • …",
    "math ≤ ≥ ∞ ∑ √ ∫ ≠",
    "arrows ← → ↑ ↓",
    "def f(x):\n    return x * 2\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    '{"key": "value", "n": [1, 2, 3]}',
    "https://example.org/path?q=1&r=2#frag",
    "user@example.com",
    "ALL CAPS SENTENCE HERE",
    "MiXeD cAsE wOrDs",
    "a",
    " ",
    "",
    "x" * 40,
    "ab" * 25,
    "unseen words: zyxwvut qqqq jjjj",
    "Über größe straße Œuvre ǅ ǈ",
    "numbers12and34letters56",
    "end with newline\n",
    "  \t  mixed \t whitespace \t ",
    "<|endoftext|> special in text",
]


def gen_tokenizers():
    tdir = FIX / "tokenizers"
    tdir.mkdir(parents=True, exist_ok=True)
    cases = {"generator": "tools/gen_tiny_models.py", "tokenizers": tokenizers.__version__,
             "strings": TEST_STRINGS, "styles": {}}
    for style in TOKENIZER_STYLES:
        tok = train_tokenizer(style)
        path = tdir / f"{style}.json"
        tok.save(str(path))
        tok = Tokenizer.from_file(str(path))
        ids = [tok.encode(s, add_special_tokens=False).ids for s in TEST_STRINGS]
        ids_special = [tok.encode(s, add_special_tokens=True).ids for s in TEST_STRINGS]
        decoded = [tok.decode(i, skip_special_tokens=False) for i in ids]
        cases["styles"][style] = {"file": f"tokenizers/{style}.json", "vocab_size": tok.get_vocab_size(),
                                  "ids": ids, "ids_with_special": ids_special, "decoded": decoded}
        print(style, "vocab", tok.get_vocab_size(), "sample", ids[1])
    (FIX / "tokenizer_cases.json").write_text(json.dumps(cases, ensure_ascii=False, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------
# (3) the bundled demo model: Llama-3 style, trained briefly on a tiny corpus
# ---------------------------------------------------------------------------------------------

DEMO_TEXT = """\
Once upon a time there was a little robot named Stowage. Stowage lived in a big warehouse
full of boxes. Every morning Stowage counted the boxes and put them on the shelves.
The boxes were heavy, but Stowage was strong. When a box did not fit on one shelf, Stowage
put part of it on the next shelf, and part of it in the basement.
One day a large crate arrived. It was too big for any shelf in the warehouse.
Stowage thought for a while and then said: I will split the crate into layers.
The first layers go to the fast shelf, the middle layers go to the slow shelf, and the last
layers go to the basement. When I need a layer, I will fetch it before I use it.
And so the large crate fit into the small warehouse, and everyone was happy.
The end.
"""


def gen_demo(out_dir: Path, steps: int = 300):
    torch.manual_seed(1234)
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = TOKENIZER_STYLES["llama3"][0]()
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([DEMO_TEXT] * 4 + build_corpus()[:4], trainer=trainer)
    bos, eos = tok.token_to_id(specials[0]), tok.token_to_id(specials[1])
    tok.post_processor = processors.TemplateProcessing(single=f"{specials[0]} $A",
                                                       special_tokens=[(specials[0], bos)])
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=128, intermediate_size=384,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=500000.0,
                      rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=64),
                      tie_word_embeddings=True, bos_token_id=bos, eos_token_id=eos)
    model = LlamaForCausalLM(cfg)
    paras = [p.strip().replace("\n", " ") for p in DEMO_TEXT.split("\n") if p.strip()]
    doc = [bos] + tok.encode(" ".join(paras), add_special_tokens=False).ids + [eos]
    data = torch.tensor(doc * 8)
    seq = 64
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    t0 = time.time()
    for step in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (16,))
        x = torch.stack([data[s:s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"demo step {step} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    model.eval()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    gen = transformers.GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
                                        do_sample=False, max_new_tokens=64)
    gen.save_pretrained(out_dir)
    tok.save(str(out_dir / "tokenizer.json"))
    prompt = "Once upon a time"
    ids = tok.encode(prompt).ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), generation_config=gen)[0, len(ids):].tolist()
    text = tok.decode(out, skip_special_tokens=True)
    print("demo greedy:", repr(text))
    fx = {"generator": "tools/gen_tiny_models.py", "model_dir": "models/tiny-llama", "prompt": prompt,
          "prompt_ids": ids, "greedy_ids": out, "greedy_text": text}
    (FIX / "tiny_llama_demo.json").write_text(json.dumps(fx, ensure_ascii=False, indent=1) + "\n")


def main():
    FIX.mkdir(parents=True, exist_ok=True)
    what = set(sys.argv[1:]) or {"models", "tokenizers", "demo"}
    if "models" in what:
        gen_models()
    if "tokenizers" in what:
        gen_tokenizers()
    if "demo" in what:
        gen_demo(ROOT / "examples" / "models" / "tiny-llama")


if __name__ == "__main__":
    main()
