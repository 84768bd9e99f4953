"""Encoding speed of the RWKV World tokenizer: our encoders vs the rwkv package's TRIE_TOKENIZER.

    python eval/bench_tokenizer.py                  # ~3.5 MB of text, then all of it mixed
    python eval/bench_tokenizer.py --mb 1 --repeats 1

Corpora: English (../shared/data/tinyshakespeare.txt next to the checkout, skipped when absent),
and generated Chinese, emoji, Python code (the standard library's source) and random Unicode,
then all of them concatenated ("mixed"). Every implementation's ids are checked against
TRIE_TOKENIZER. Rows:

  trie (rwkv pkg)   BlinkDL's reference, rwkv.rwkv_tokenizer.TRIE_TOKENIZER
  python cold       our encoder, first pass over the corpus (its segment cache empty)
  python warm       our encoder, best of --repeats later passes (cache filled)
  rust              pyrwkv_tokenizer (when installed), best of --repeats
  *, lines          encode_batch over the corpus's lines vs TRIE_TOKENIZER line by line

Prints a markdown table: MB/s (UTF-8 bytes per second) and the ratio to TRIE_TOKENIZER.
"""
import argparse
import gc
import os
import random
import sysconfig
import time

from rwkv_diffusion_rnn.data import tokenizer as tk

HERE = os.path.dirname(os.path.abspath(__file__))
SHAKESPEARE = os.path.join(HERE, "..", "..", "shared", "data", "tinyshakespeare.txt")

CHINESE_WORDS = (
    "我们 你们 他们 今天 明天 昨天 时间 世界 中国 北京 上海 学校 老师 学生 朋友 工作 生活 问题 "
    "发展 经济 社会 文化 历史 科学 技术 研究 方法 系统 数据 模型 语言 文字 计算机 人工智能 "
    "非常 已经 可以 没有 因为 所以 但是 如果 虽然 而且 喜欢 认为 知道 觉得 开始 结束 公园 "
    "天气 美好 一起 散步 吃饭 喝茶 看书 写字 城市 国家 重要 简单 复杂 快乐 安静 的 了 是 在 和"
).split()
CHINESE_PUNCT = ["，", "。", "！", "？", "、", "；", "：", "“", "”", "（", "）", "\n"]
EMOJI = (
    "😀 😂 🥲 😍 🤔 🙄 😴 🤯 🥳 😎 👍 👍🏽 👎🏿 👋 🙏 💪🏻 🎉 🔥 ✨ ❤️ 💔 ⭐ 🌍 🚀 🐍 🦀 🍕 ☕ "
    "👨‍👩‍👧‍👦 👩🏾‍💻 🏳️‍🌈 🇨🇳 🇺🇸 🇯🇵 🇩🇪 1️⃣ #️⃣ ©️ ™️"
).split()
# Code point ranges for random text (no surrogates): Latin, Greek, Cyrillic, Hebrew, Arabic,
# Devanagari, Thai, Hangul, kana, CJK, symbols, astral planes.
UNICODE_RANGES = [
    (0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x5FF), (0x600, 0x6FF),
    (0x900, 0x97F), (0xE00, 0xE7F), (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3),
    (0x2000, 0x2BFF), (0xE000, 0xF8FF), (0x1F300, 0x1FAFF), (0x10000, 0x10FFFF),
]


def chinese(n_bytes: int, rng: random.Random) -> str:
    out, size = [], 0
    while size < n_bytes:
        piece = rng.choice(CHINESE_WORDS) if rng.random() < 0.85 else rng.choice(CHINESE_PUNCT)
        out.append(piece)
        size += len(piece.encode())
    return "".join(out)


def emoji(n_bytes: int, rng: random.Random) -> str:
    out, size = [], 0
    while size < n_bytes:
        piece = rng.choice(EMOJI) + rng.choice(["", "", " ", " ok ", "!", "\n", "好"])
        out.append(piece)
        size += len(piece.encode())
    return "".join(out)


def code(n_bytes: int) -> str:
    stdlib = sysconfig.get_paths()["stdlib"]
    out, size = [], 0
    for name in sorted(os.listdir(stdlib)):
        if name.endswith(".py") and size < n_bytes:
            with open(os.path.join(stdlib, name), encoding="utf-8", errors="replace") as f:
                out.append(f.read())
            size += len(out[-1].encode())
    return "".join(out)


def random_unicode(n_bytes: int, rng: random.Random) -> str:
    out, size = [], 0
    while size < n_bytes:
        lo, hi = rng.choice(UNICODE_RANGES)
        run = "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 12)))
        run += rng.choice(["", " ", "\n", ", "])
        out.append(run)
        size += len(run.encode())
    return "".join(out)


def corpora(mb: float) -> dict[str, str]:
    rng = random.Random(0)
    part = int(mb * 1e6 / 5)
    texts = {}
    if os.path.isfile(SHAKESPEARE):
        with open(SHAKESPEARE, encoding="utf-8") as f:
            texts["english"] = f.read()[:part]
    texts["chinese"] = chinese(part, rng)
    texts["emoji"] = emoji(part // 2, rng)
    texts["code"] = code(part)
    texts["random unicode"] = random_unicode(part // 2, rng)
    texts["mixed"] = "".join(texts.values())
    return texts


def timed(fn, arg, repeats: int):
    # TRIE_TOKENIZER holds ~10^5 Python objects; keep the garbage collector from re-scanning
    # them (and charging that to whichever encoder happens to allocate) during a timing.
    gc.collect()
    gc.freeze()
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(arg)
        best = min(best, time.perf_counter() - t0)
    return best, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=4.0,
                    help="MB of text in all (English ~1/5, capped by the file; the rest generated)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    vocab = tk.find_vocab_file()
    trie = TRIE_TOKENIZER(vocab)
    rust = tk.RWKVWorldTokenizer(vocab, backend="auto")
    has_rust = rust.backend == "rust"
    print(f"vocabulary: {vocab}")
    print(f"rust encoder (pyrwkv_tokenizer): {'yes' if has_rust else 'not installed'}\n")
    print("| corpus | MB | implementation | MB/s | x trie |")
    print("|---|---:|---|---:|---:|")
    for name, text in corpora(args.mb).items():
        data = text.encode("utf-8")
        mb = len(data) / 1e6
        t_ref, ref = timed(trie.encode, text, 1)
        rows = [("trie (rwkv pkg)", t_ref)]
        ours = tk._GreedyEncoder(tk.read_vocab(vocab))  # a fresh cache for the cold pass
        t_cold, ids = timed(ours.encode, data, 1)
        assert ids == ref, f"python encoder differs from TRIE_TOKENIZER on {name}"
        rows.append(("python cold", t_cold))
        rows.append(("python warm", timed(ours.encode, data, args.repeats)[0]))
        if has_rust:
            t, ids = timed(rust.encode, text, args.repeats)
            assert ids == ref, f"rust encoder differs from TRIE_TOKENIZER on {name}"
            rows.append(("rust", t))
        if name == "mixed":  # many short texts: the batch APIs
            lines = text.splitlines(keepends=True)
            t_ref, ref = timed(lambda ls: [trie.encode(x) for x in ls], lines, 1)
            rows.append(("trie, lines", t_ref))
            ours = tk._GreedyEncoder(tk.read_vocab(vocab))
            blines = [x.encode() for x in lines]
            t, ids = timed(ours.encode_many, blines, 1)
            assert ids == ref
            rows.append(("python cold, lines", t))
            rows.append(("python warm, lines", timed(ours.encode_many, blines, args.repeats)[0]))
            if has_rust:
                t, ids = timed(rust.encode_batch, lines, args.repeats)
                assert ids == ref
                rows.append(("rust, lines", t))
        base = {True: None, False: None}
        for impl, t in rows:
            lines_row = impl.endswith("lines")
            if impl.startswith("trie"):
                base[lines_row] = t
            print(f"| {name} | {mb:.2f} | {impl} | {mb / t:.1f} | {base[lines_row] / t:.1f} |")


if __name__ == "__main__":
    main()
