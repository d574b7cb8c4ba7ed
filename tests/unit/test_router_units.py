"""The router's pure parts: dispatch choices, incremental detokenization with stop strings,
request validation and SamplingParams from the wire message. No Ray, no gRPC server."""
from __future__ import annotations

import math

import pytest

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from engine.validation import validate_request
from protos import pdcluster_pb2 as pb
from router.detokenizer import Detokenizer
from router.dispatch import InstanceView, pick_decode, pick_prefill


# -- dispatch ------------------------------------------------------------------------------------
def _p(name, queued=0, active=0, available=True):
    return InstanceView(name, "prefill", queued_tokens=queued, active=active, available=available)


def _d(name, free=0, assigned=0, active=0, available=True, num_blocks=100):
    return InstanceView(name, "decode", free_blocks=free, assigned_blocks=assigned, active=active,
                        available=available, num_blocks=num_blocks)


def test_pick_prefill_least_queued_tokens_then_fewest_requests():
    views = [_p("p0", queued=300), _p("p1", queued=40, active=5), _p("p2", queued=120)]
    assert pick_prefill(views).name == "p1"
    views = [_p("p0", queued=40, active=3), _p("p1", queued=40, active=1), _p("p2", queued=41, active=0)]
    assert pick_prefill(views).name == "p1"
    # a full tie is broken by name, deterministically
    assert pick_prefill([_p("pb"), _p("pa")]).name == pick_prefill([_p("pa"), _p("pb")]).name


def test_pick_prefill_skips_dead_and_decode_instances():
    views = [_p("p0", queued=0, available=False), _p("p1", queued=500), _d("d0", free=99)]
    assert pick_prefill(views).name == "p1"
    assert pick_prefill([_p("p0", available=False), _d("d0")]) is None
    assert pick_prefill([]) is None


def test_pick_decode_most_room_net_of_assigned_blocks():
    views = [_d("d0", free=50), _d("d1", free=80, assigned=40), _d("d2", free=60)]
    assert pick_decode(views, blocks_needed=5).name == "d2"      # rooms 50, 40, 60
    # equal room: the smaller batch
    views = [_d("d0", free=30, active=4), _d("d1", free=30, active=2)]
    assert pick_decode(views, blocks_needed=5).name == "d1"


def test_pick_decode_prefers_an_instance_that_fits():
    # both fit: the most room wins
    views = [_d("d0", free=10), _d("d1", free=12)]
    assert pick_decode(views, blocks_needed=10).name == "d1"
    # only d0 fits: d0, even though it is busier
    views = [_d("d0", free=10, active=9), _d("d1", free=9, active=0)]
    assert pick_decode(views, blocks_needed=10).name == "d0"


def test_pick_decode_still_chooses_when_none_can_fit():
    views = [_d("d0", free=3), _d("d1", free=7, assigned=2), _d("d2", free=4)]
    assert pick_decode(views, blocks_needed=50).name == "d1"     # rooms 3, 5, 4: the most room queues it
    # over-assigned (negative room) instances are still candidates
    views = [_d("d0", free=2, assigned=10), _d("d1", free=0, assigned=3)]
    assert pick_decode(views, blocks_needed=1).name == "d1"


def test_pick_decode_counts_the_prompt_blocks_an_instance_holds():
    """KV-aware: blocks of the prompt cached on an instance cost it no new block (and no transfer)."""
    views = [_d("d0", free=40), _d("d1", free=30)]
    held = {"d0": 0, "d1": 12}
    assert pick_decode(views, blocks_needed=20).name == "d0"                             # no cache: room
    assert pick_decode(views, blocks_needed=20, held=lambda v: held[v.name]).name == "d1"  # 22 left vs 20
    # it fits only with what it holds: still the one that can take it now
    views = [_d("d0", free=15), _d("d1", free=12)]
    assert pick_decode(views, blocks_needed=20).name == "d0"
    assert pick_decode(views, blocks_needed=20, held=lambda v: held[v.name]).name == "d1"


def test_pick_decode_skips_dead_and_prefill_instances():
    views = [_d("d0", free=1000, available=False), _d("d1", free=1), _p("p0")]
    assert pick_decode(views, blocks_needed=4).name == "d1"
    assert pick_decode([_d("d0", available=False), _p("p0")], blocks_needed=1) is None
    assert pick_decode([], blocks_needed=1) is None


# -- detokenizer: a byte-level tokenizer (fast, exact control over the splits) ----------------------
class ByteTokenizer:
    """Ids 0..255 are bytes, 256 is a special token (like an EOS): decodes as HF tokenizers do."""

    SPECIAL = 256

    def decode(self, ids, skip_special_tokens=False):
        out = bytes(i for i in ids if i != self.SPECIAL)
        text = out.decode("utf-8", errors="replace")
        if not skip_special_tokens and self.SPECIAL in ids:
            text += "<eos>"
        return text

    @staticmethod
    def encode(text: str) -> list[int]:
        return list(text.encode("utf-8"))


def _feed(detok: Detokenizer, ids, chunk: int = 1, final_at_end: bool = True) -> list[str]:
    deltas = []
    for i in range(0, len(ids), chunk):
        last = i + chunk >= len(ids)
        deltas.append(detok.add(ids[i:i + chunk], final=final_at_end and last))
        if detok.stopped:
            break
    return deltas


TEXTS = ["héllo wörld", "日本語のテキスト", "emoji 😀👍🏽 mixed ✓ text", "plain ascii"]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_byte_split_characters_never_emit_replacement_chars(text, chunk):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    detok = Detokenizer(tok)
    deltas = _feed(detok, ids, chunk)
    assert all("\ufffd" not in d for d in deltas), deltas
    assert "".join(deltas) == text
    assert not detok.stopped


def test_text_streams_as_soon_as_a_character_is_complete():
    tok = ByteTokenizer()
    detok = Detokenizer(tok)
    e_acute = "é".encode()
    assert detok.add([ord("a")]) == "a"
    assert detok.add([e_acute[0]]) == ""            # half a character: held
    assert detok.add([e_acute[1]]) == "é"
    assert detok.add([ByteTokenizer.SPECIAL]) == ""  # special tokens are skipped
    assert detok.add([ord("b")], final=True) == "b"


def test_stop_string_within_one_call_and_spanning_tokens():
    tok = ByteTokenizer()
    text = "Hello, world. Goodbye"
    for stop in ["world", "o, w", ".", "He", "Goodbye"]:
        detok = Detokenizer(tok, (stop,))
        deltas = _feed(detok, tok.encode(text), chunk=1, final_at_end=False)
        assert detok.stopped, stop
        assert "".join(deltas) == text[:text.find(stop)], stop
        assert stop not in "".join(deltas)


def test_stop_string_split_over_a_multibyte_character():
    tok = ByteTokenizer()
    text = "voilà le café noir"
    detok = Detokenizer(tok, ("é n",))
    deltas = _feed(detok, tok.encode(text), final_at_end=False)
    assert detok.stopped and "".join(deltas) == "voilà le caf"
    assert all("\ufffd" not in d for d in deltas)


def test_earliest_of_several_stops_wins_and_unmatched_text_is_flushed_at_the_end():
    tok = ByteTokenizer()
    text = "one two three four"
    detok = Detokenizer(tok, ("four", "two"))
    assert "".join(_feed(detok, tok.encode(text), final_at_end=False)) == "one "
    assert detok.stopped
    # a stop never seen: the held-back tail comes out with the final tokens
    detok = Detokenizer(tok, ("xyz!",))
    deltas = _feed(detok, tok.encode(text))
    assert "".join(deltas) == text and not detok.stopped
    assert deltas[-1] != ""                         # the last call released the held tail


def test_the_last_longest_stop_minus_one_characters_are_held_back_then_released():
    tok = ByteTokenizer()
    detok = Detokenizer(tok, ("STOP", "x"))
    out = "".join(detok.add([c]) for c in tok.encode("abcST"))
    assert out == "ab"                                 # "cST" could still grow into "STOP"
    out += detok.add(tok.encode("OX"))                 # "abcSTOX": never the stop string
    assert out == "abcS" and not detok.stopped         # 3 characters held, no more
    out += detok.add(tok.encode("!"), final=True)
    assert out == "abcSTOX!" and not detok.stopped


def test_stop_at_the_very_start_gives_empty_text():
    tok = ByteTokenizer()
    detok = Detokenizer(tok, ("ab",))
    assert detok.add([ord("a")]) == "" and detok.add([ord("b")]) == ""
    assert detok.stopped


def test_no_tokenizer_gives_no_text():
    detok = Detokenizer(None, ("x",))
    assert detok.add([1, 2, 3]) == "" and detok.add([4], final=True) == ""
    assert detok.token_ids == [1, 2, 3, 4] and not detok.stopped


# -- detokenizer: the default model's tokenizer ----------------------------------------------------
@pytest.fixture(scope="module")
def smollm_tokenizer():
    from engine import default_model_path
    from engine.tokenizer import load_tokenizer
    tok = load_tokenizer(default_model_path())
    assert tok is not None
    return tok


REAL_TEXTS = [
    "The capital of France is Paris. It isn't small!",
    "héllo 😀 日本語 ok — naïve café, Ωmega ≠ 42 🇫🇷",
    "def f(x):\n    return x ** 2  # 平方\n",
]


@pytest.mark.slow
@pytest.mark.parametrize("text", REAL_TEXTS)
def test_real_tokenizer_deltas_concatenate_to_the_full_decode(smollm_tokenizer, text):
    tok = smollm_tokenizer
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    # the tokenizer really splits some characters over several tokens here
    if any(ord(c) > 0x7FF for c in text):
        assert any(tok.decode(ids[:i]).endswith("\ufffd") for i in range(1, len(ids)))
    detok = Detokenizer(tok)
    deltas = _feed(detok, ids)
    assert all("\ufffd" not in d for d in deltas), deltas
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.slow
def test_real_tokenizer_stop_strings(smollm_tokenizer):
    tok = smollm_tokenizer
    text = "The capital of France is Paris. It isn't small!"
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [tok.decode([i]) for i in ids]
    # a stop string made of the end of one token and the start of the next
    j = next(k for k in range(1, len(pieces)) if len(pieces[k - 1]) >= 2 and len(pieces[k]) >= 2)
    spanning = pieces[j - 1][-2:] + pieces[j][:2]
    for stop in [spanning, "Paris", ".", "small!"]:
        detok = Detokenizer(tok, (stop, "never-there"))
        deltas = _feed(detok, ids, final_at_end=False)
        assert detok.stopped, stop
        full = tok.decode(ids, skip_special_tokens=True)
        assert "".join(deltas) == full[:full.find(stop)], stop
    # chunks of several tokens at once (a decode step that returns more than one)
    detok = Detokenizer(tok, ("Paris",))
    assert "".join(_feed(detok, ids, chunk=4, final_at_end=False)) == "The capital of France is "
    assert detok.stopped


@pytest.mark.slow
def test_real_tokenizer_emoji_split_and_stop_after_it(smollm_tokenizer):
    tok = smollm_tokenizer
    text = "ok 😀 then 日本 end"
    ids = tok.encode(text, add_special_tokens=False)
    detok = Detokenizer(tok, ("本 e",))
    deltas = _feed(detok, ids, final_at_end=False)
    assert detok.stopped and "".join(deltas) == "ok 😀 then 日"
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.slow
def test_real_tokenizer_random_ids_in_random_chunks_match_the_full_decode(smollm_tokenizer):
    import random
    tok = smollm_tokenizer
    rng = random.Random(7)
    for _ in range(20):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 120))]
        detok = Detokenizer(tok)
        out, i = [], 0
        while i < len(ids):
            n = rng.randrange(1, 5)
            out.append(detok.add(ids[i:i + n], final=i + n >= len(ids)))
            i += n
        assert "".join(out) == tok.decode(ids, skip_special_tokens=True)


class _CountingTokenizer:
    """The real tokenizer, counting how many token ids each decode is given."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, 0

    def decode(self, ids, **kw):
        self.decoded += len(ids)
        return self.tok.decode(ids, **kw)


@pytest.mark.slow
def test_detokenizer_work_is_linear_in_the_output(smollm_tokenizer):
    tok = _CountingTokenizer(smollm_tokenizer)
    ids = smollm_tokenizer.encode("The capital of France is Paris. " * 200, add_special_tokens=False)
    detok = Detokenizer(tok, ("never-there",))
    text = "".join(detok.add([i]) for i in ids) + detok.add([], final=True)
    assert text == smollm_tokenizer.decode(ids)
    # a full re-decode per token would be ~len(ids)**2 / 2 ids
    assert tok.decoded < 8 * len(ids), (tok.decoded, len(ids))


# -- validate_request -----------------------------------------------------------------------------------
def test_validate_request_accepts_what_fits():
    validate_request([1, 2, 3], SamplingParams(max_tokens=5), vocab_size=10, max_model_len=8)
    validate_request([0, 9], SamplingParams(max_tokens=2), 10, 4, num_blocks=1, block_size=4)


@pytest.mark.parametrize("ids,max_tokens,match", [
    ([], 4, "prompt is empty"),
    ([1, 10, 2], 4, "token id 10 is outside"),
    ([1, -1, 2], 4, "token id -1 is outside"),
    ([1] * 32, 1, "32 tokens; the model's context is 32"),
    ([1] * 20, 13, r"\+ max_tokens \(13\) exceeds the context of 32"),
])
def test_validate_request_rejects_with_the_problem_named(ids, max_tokens, match):
    with pytest.raises(InvalidRequestError, match=match):
        validate_request(ids, SamplingParams(max_tokens=max_tokens), vocab_size=10, max_model_len=32)


def test_validate_request_checks_the_smallest_cache():
    params = SamplingParams(max_tokens=4)
    validate_request([1] * 12, params, 10, 64, num_blocks=4, block_size=4)       # 16 tokens = 4 blocks
    with pytest.raises(InvalidRequestError, match="needs 5 KV blocks; the cache has 4"):
        validate_request([1] * 13, params, 10, 64, num_blocks=4, block_size=4)


# -- SamplingParams.from_message ---------------------------------------------------------------------------
def test_from_message_unset_fields_take_the_defaults():
    got = SamplingParams.from_message(pb.SamplingParams())
    assert got == SamplingParams()
    assert (got.max_tokens, got.temperature, got.top_p, got.top_k, got.seed, got.stop, got.ignore_eos) == \
        (16, 1.0, 1.0, 0, None, (), False)


def test_from_message_explicit_values_are_kept():
    msg = pb.SamplingParams(max_tokens=7, temperature=0.0, top_p=0.5, top_k=-1, seed=0, stop=["\n\n", "END"],
                            ignore_eos=True)
    got = SamplingParams.from_message(msg)
    assert got.max_tokens == 7 and got.greedy           # an explicit 0 is greedy, not "unset"
    assert got.temperature == 0.0 and got.top_p == 0.5 and got.top_k == -1
    assert got.seed == 0                                 # an explicit 0 seed is a seed
    assert got.stop == ("\n\n", "END") and got.ignore_eos
    got = SamplingParams.from_message(pb.SamplingParams(temperature=0.7, seed=-5))
    assert math.isclose(got.temperature, 0.7, rel_tol=1e-6) and got.seed == -5 and got.max_tokens == 16


@pytest.mark.parametrize("fields,name", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(stop=["ok", ""]), "stop"),
])
def test_from_message_rejects_bad_values_naming_the_field(fields, name):
    with pytest.raises(InvalidRequestError, match=name):
        SamplingParams.from_message(pb.SamplingParams(**fields))
