"""Quality flags on real text: captions and answers written by hand for this test (in the style of
LLaVA-OneVision's and ShareGPT4Video's published examples), with the flags each must and must not get."""

from __future__ import annotations

import pytest

from pipeline.config import QualityConfig
from pipeline.quality import quality_flags

VIDEO = "Describe this video in detail."
IMAGE = "Describe this image in detail."

GOOD_CAPTIONS = [
    "The video shows a man in a red jacket riding a bicycle down a busy city street. Cars pass him on the left, and "
    "pedestrians wait at a crosswalk as the traffic light turns green.",
    "A golden retriever runs across a grassy park, chasing a yellow tennis ball. The dog catches the ball, turns "
    "around and trots back toward its owner, who is standing near a wooden bench.",
    "In this image, a plate of spaghetti with tomato sauce and basil leaves sits on a white tablecloth. A glass of "
    "red wine and a fork are placed to the right of the plate.",
    "The video begins with a wide shot of a snowy mountain range at sunrise. The camera slowly pans to the right, "
    "revealing a small cabin with smoke rising from its chimney. Then the scene cuts to a skier descending a steep "
    "slope, leaving a trail of powder behind. In the background, the sun rises above the peaks, and the sky turns "
    "from pink to blue. The video ends with the skier stopping in front of the cabin and waving at the camera.",
    "A woman in a blue apron is kneading dough on a floured wooden countertop. She folds the dough, presses it with "
    "the heels of her hands, and turns it a quarter turn. On the left side of the frame there is a bowl of flour, "
    "and on the right side of the frame there is a rolling pin. The kitchen is brightly lit by a window in the "
    "background.",
    "Two children are building a sandcastle on a beach. The boy fills a bucket with wet sand while the girl shapes "
    "the towers with her hands. Waves roll onto the shore behind them, and seagulls fly overhead.",
    "This is a screenshot of a spreadsheet with columns labeled Date, Product, Units and Revenue. The rows list sales "
    "figures for January through March, and the total revenue of 12,450 dollars is highlighted in yellow.",
    "A time-lapse of clouds moving quickly over a city skyline at dusk; the lights of the skyscrapers switch on one "
    "by one as the sky darkens.",
    "Un chat noir dort sur le rebord d'une fenêtre ensoleillée, à côté d'un pot de fleurs rouges.",
    "一只黑猫在阳光明媚的窗台上睡觉，旁边放着一盆红色的花。",
    "The video shows a chef slicing vegetables. The chef slices a carrot, then the chef slices an onion, and then "
    "the chef slices a pepper, placing each piece in a metal bowl.",
]

GOOD_ANSWERS = [  # (question, answer): short answers are fine for questions
    ("What color is the car?", "The car is red."),
    ("How many people are in the video?", "Three."),
    ("Is the dog wearing a collar?", "Yes"),
    ("What is the total revenue?", "12,450"),
    ("Is the car red or blue?", "Red."),  # one word of the question: an answer, not an echo
    ("What is the man doing?", "The man is riding a bicycle."),
    ("What is written on the sign?", "The sign says \"Open 24 hours\"."),
]

DEGENERATE = [  # (text, prompt, task, finish_reason, flags it must get)
    ("", VIDEO, "caption", "stop", {"empty"}),
    ("   \n ", VIDEO, "caption", "stop", {"empty"}),
    ("The video shows a man walking his dog along the river. The man walking his dog along the river. The man walking "
     "his dog along the river. The man walking his dog along the", VIDEO, "caption", "length", {"repetition", "truncated"}),
    ("a cat a cat a cat a cat a cat a cat a cat a cat", IMAGE, "caption", "stop", {"repetition"}),
    ("The image shows a table with a red red red red red red red red red red red red", IMAGE, "caption", "length",
     {"repetition", "truncated"}),
    ("anunsunssing\ufffd\ufffdunsunsunsuns", VIDEO, "caption", "length", {"repetition", "truncated", "length_outlier"}),  # the quickstart's noise
    # the tiny random-weight model's noise (24 tokens)
    (" dowayen brightlks\ufffd\ufffdqith moun\ufffd ro\ufffd\ufffd windows\ufffdughx caerill runsilmedil", VIDEO, "caption", "length",
     {"not_text", "truncated"}),
    ("ro bright\r\ufffd\ufffdeningsing\ufffdcro lined\ufffd while\ufffd while\x1b\ufffd\ufffd? ballan isde\ufffdilmed", IMAGE, "caption",
     "length", {"not_text", "truncated"}),
    ("The video shows a woman holding a sign that reads caf\ufffd", VIDEO, "caption", "length", {"truncated"}),  # cut mid-character
    ("\n@outs ontver\n\x05 lightr ta sunsetTa#; What runs dowline8YIs", VIDEO, "caption", "length", {"truncated", "not_text"}),
    ("A dog runs along the beach\x05 chasing a ball.", VIDEO, "caption", "stop", {"not_text"}),  # one control character
    ("hahahahahahahahahahahahahahahahaha", VIDEO, "caption", "stop", {"repetition", "length_outlier"}),  # no spaces: judged in characters
    ("Describe this video in detail.", VIDEO, "caption", "stop", {"echo"}),
    ("What color is the car?", "What color is the car?", "qa", "stop", {"echo"}),
    ("A dog.", IMAGE, "caption", "stop", {"length_outlier"}),
    ("\ufffd\ufffd\ufffd \ufffd\x07\x08\ufffd", VIDEO, "caption", "stop", {"not_text", "length_outlier"}),  # no word
    ("!!!!,,,;;;...:::---", VIDEO, "qa", "stop", {"not_text"}),
    ("The answer is \x00\x01\x02\x03\x04\x05\x06\x0e\x0f\x10\x11\x12\x13\x14", "What is shown?", "qa", "stop", {"not_text"}),
    ("The video shows a long road that stretches into the distance under a clear blue sky with", VIDEO, "caption",
     "length", {"truncated"}),
]


@pytest.mark.parametrize("text", GOOD_CAPTIONS)
def test_real_captions_get_no_flags(text):
    assert quality_flags(text, prompt=VIDEO, task="caption", finish_reason="stop") == []


@pytest.mark.parametrize("question, answer", GOOD_ANSWERS)
def test_real_short_answers_get_no_flags(question, answer):
    assert quality_flags(answer, prompt=question, task="qa", finish_reason="stop") == []


@pytest.mark.parametrize("text, prompt, task, finish, expected", DEGENERATE)
def test_degenerate_text_gets_its_flags_and_only_those(text, prompt, task, finish, expected):
    assert set(quality_flags(text, prompt=prompt, task=task, finish_reason=finish)) == expected


def test_repetition_in_tokens_when_the_words_look_fine():
    """A loop that detokenizes into one long 'word' (no spaces) is found in the token ids."""
    loop = [101, 2023, 318] * 8
    word = "Supercalifragilisticexpialidocious"
    assert quality_flags(word, task="qa", token_ids=loop) == ["repetition"]
    assert quality_flags(word, task="qa", token_ids=list(range(20))) == []


def test_a_loop_of_pieces_shorter_than_a_token_is_found_in_the_characters():
    """The quickstart's loop: its 16 tokens do not repeat as tokens, its characters end in 'uns' x 4."""
    assert "repetition" in quality_flags("anunsunssing\ufffd\ufffdunsunsunsuns", token_ids=list(range(16)), finish_reason="length")


def test_thresholds_are_configurable():
    text = "A dog runs."
    assert quality_flags(text) == ["length_outlier"]
    assert quality_flags(text, cfg=QualityConfig(min_caption_words=3)) == []
    long = " ".join(f"w{i}" for i in range(50))
    assert quality_flags(long, cfg=QualityConfig(max_words=40)) == ["length_outlier"]


def subword_ids(text: str, vocab: dict) -> list[int]:
    """Stand-in for a BPE tokenizer: each word (with its leading space) in pieces of up to 4 characters."""
    import re

    pieces = [w[i:i + 4] for w in re.findall(r"\s*\S+", text) for i in range(0, len(w), 4)]
    return [vocab.setdefault(p, len(vocab)) for p in pieces]


@pytest.mark.parametrize("text", GOOD_CAPTIONS)
def test_real_captions_get_no_flags_in_subword_tokens_either(text):
    assert quality_flags(text, prompt=VIDEO, token_ids=subword_ids(text, {}), finish_reason="stop") == []


def test_a_loop_in_subword_tokens_is_flagged():
    loop = "The man walking his dog along the river. " * 4
    assert "repetition" in quality_flags(loop, prompt=VIDEO, token_ids=subword_ids(loop, {}), finish_reason="length")
