"""The preprocessing commands spell each flag one way, and accept the other spelling too.

The DiffRwkv README spells ``--trust-remote-code``, ``--local-files-only`` and ``--cache-dir`` with
hyphens and ``--json_path``, ``--output_dir``, ``--max_length`` with underscores; users type either.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from rwkv_diffusion_rnn import prepare_latents, preprocess_tokenize_text

REPO = Path(__file__).resolve().parent.parent
REQUIRED = {
    "prepare_latents": (prepare_latents.build_parser, ["--input", "c.txt", "--name", "n"]),
    "preprocess_tokenize_text": (preprocess_tokenize_text.build_parser, ["--json_path", "d.json", "--output_dir", "o"]),
}
README_SPELLINGS = ["--trust-remote-code", "--local-files-only", "--cache-dir", "--json_path", "--output_dir",
                    "--max_length"]


def long_options(parser):
    """{dest: option strings} of every flag that has a long option."""
    return {a.dest: [s for s in a.option_strings if s.startswith("--")]
            for a in parser._actions if any(s.startswith("--") for s in a.option_strings) and a.dest != "help"}


def args_with(required, action, spelling):
    """``required`` plus ``action`` given as ``spelling`` (a required flag's spelling is swapped in place)."""
    given = next((s for s in action.option_strings if s in required), None)
    if given is not None:
        return [spelling if a == given else a for a in required]
    if action.nargs == 0:  # store_true
        return required + [spelling]
    return required + [spelling, "7" if action.type in (int, float) else "x"]


@pytest.mark.parametrize("cli", sorted(REQUIRED))
def test_both_spellings_of_every_flag_parse_alike(cli):
    build, required = REQUIRED[cli]
    pairs = 0
    for action in build()._actions:
        spellings = [s for s in action.option_strings if s.startswith("--")]
        if len(spellings) < 2:
            continue
        parsed = [vars(build().parse_args(args_with(required, action, s))) for s in spellings]
        assert all(p == parsed[0] for p in parsed), (cli, spellings)
        assert parsed[0] != vars(build().parse_args(required)) or spellings[0] in required, (cli, spellings)
        pairs += 1
    assert pairs >= 6, cli


def test_one_spelling_per_flag_across_both_commands():
    lat = long_options(prepare_latents.build_parser())
    tok = long_options(preprocess_tokenize_text.build_parser())
    shown = {opts[0] for opts in list(lat.values()) + list(tok.values())}
    for flag in README_SPELLINGS:  # the README's spelling is the one shown first, wherever the flag exists
        assert flag in shown, flag
    for dest in set(lat) & set(tok):  # a flag both commands have is spelled the same in both
        assert lat[dest] == tok[dest], dest
    for dest in ("trust_remote_code", "local_files_only", "cache_dir"):
        assert lat[dest][1] == tok[dest][1] == "--" + dest  # the underscore form is accepted
    for opts in list(lat.values()) + list(tok.values()):  # every multi-word flag takes "_" and "-"
        words = opts[0][2:].replace("-", "_")
        if "_" in words:
            assert sorted(opts) == sorted(["--" + words, "--" + words.replace("_", "-")]), opts


@pytest.mark.parametrize("args", [
    ["--trust-remote-code", "--local-files-only", "--cache-dir", "CACHE"],
    ["--trust_remote_code", "--local_files_only", "--cache_dir", "CACHE"],
])
def test_the_tokenizer_command_runs_with_either_spelling(tmp_path, args):
    js = tmp_path / "train_data.json"
    js.write_text('[{"text": "hello", "latent_path": "latents/train/00000000.npy"}]')
    r = subprocess.run([sys.executable, "rwkv_diffusion_rnn/preprocess_tokenize_text.py", "--json-path", str(js),
                        "--output-dir", str(tmp_path / "tok"), "--tokenizer", "bytes", "--max-length", "8", *args],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "tok" / "train" / "00000000.npz").is_file()


@pytest.mark.parametrize("module", ["prepare_latents", "preprocess_tokenize_text"])
def test_help_shows_the_readme_spelling_first(module):
    r = subprocess.run([sys.executable, "-m", f"rwkv_diffusion_rnn.{module}", "--help"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    for flag in ("--trust-remote-code, --trust_remote_code", "--local-files-only, --local_files_only",
                 "--cache-dir DIR, --cache_dir DIR"):
        assert flag in r.stdout, (module, flag)
