"""The built-in CLIP BPE tokenizer is reproducible and behaves like CLIP's."""

import subprocess
import sys

from sdtrt.export.tokenizer import BOS, EOS, build_clip_tokenizer, learn_clip_vocab


def test_vocabulary_is_identical_in_separate_processes():
    code = "from sdtrt.export.tokenizer import learn_clip_vocab; import json; print(json.dumps(learn_clip_vocab(400)))"
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(3)}
    assert len(runs) == 1


def test_vocabulary_has_clip_layout():
    vocab, merges = learn_clip_vocab(400)
    assert 0 < len(merges) <= 400  # the built-in corpus runs out of pairs before long
    assert len(vocab) == 512 + len({m.replace(" ", "") for m in merges} - set(list(vocab)[:512])) + 2
    ordered = sorted(vocab, key=vocab.get)
    assert ordered[:256] == [t for t in ordered[:256] if not t.endswith("</w>")]
    assert all(t.endswith("</w>") for t in ordered[256:512])
    assert ordered[-2:] == [BOS, EOS]


def test_learned_words_are_single_tokens_and_unknown_text_falls_back_to_bytes():
    tok = build_clip_tokenizer(400)
    assert tok.convert_ids_to_tokens(tok("a photo of a castle")["input_ids"]) == [
        BOS, "a</w>", "photo</w>", "of</w>", "a</w>", "castle</w>", EOS]
    ids = tok("zqxj 東京")["input_ids"]
    assert tok.unk_token_id not in ids[1:-1] and len(ids) > 4
