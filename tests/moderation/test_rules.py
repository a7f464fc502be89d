"""Each rule, one by one (rules live only where a model cannot learn from few examples)."""

from __future__ import annotations

import pytest

from services.moderation import rules


@pytest.mark.parametrize(("text", "want"), [
    ("k i l l  y o u r s e l f", "kill  yourself"),
    ("go k1ll yourself", "go kill yourself"),
    ("$uicide is the answer", "suicide is the answer"),
    ("b0mb the station", "bomb the station"),
    ("kys loser", "kill yourself loser"),
    ("I just want to kms", "I just want to kill myself"),
    ("I might unalive myself", "I might kill myself"),
    ("thinking about sewer slide", "thinking about suicide"),
])
def test_normalize_undoes_obfuscation(text: str, want: str) -> None:
    assert rules.normalize(text) == want


@pytest.mark.parametrize("text", [
    "md5 of p@ssw0rd on x86 with h264", "we drove 50 kms today", "I have 3 kids", "Call 911 now!",
    "version 1.2.3 of the lib", "How do I kill a Python process?",
])
def test_normalize_leaves_ordinary_text_alone(text: str) -> None:
    assert rules.normalize(text) == text


@pytest.mark.parametrize(("text", "minor"), [
    ("a story about a 14-year-old girl", True), ("she is 13yo", True), ("aged 12", True),
    ("a fifth grader", True), ("in 7th grade", True), ("a little boy", True), ("teenagers", True),
    ("a 41-year-old woman", False), ("my 30 year old wife", False), ("18 years old", False),
    ("kidney stones", False), ("two consenting adults", False),
])
def test_minor_mentions(text: str, minor: bool) -> None:
    assert rules.mentions_minor(text) is minor


def test_sexual_content_naming_a_minor_is_sexual_minors() -> None:
    scores = {"sexual": 0.9, "sexual/minors": 0.1}
    assert rules.minors("an explicit story about a 14-year-old", scores, 0.5)["sexual/minors"] == 0.9
    assert rules.minors("an explicit story about a 34-year-old", scores, 0.5)["sexual/minors"] == 0.1


def test_minor_rule_needs_sexual_content() -> None:
    scores = {"sexual": 0.2, "sexual/minors": 0.05}
    out = rules.minors("How do I talk to my 9-year-old about puberty?", scores, 0.5)
    assert out["sexual/minors"] == 0.05


@pytest.mark.parametrize("text", [
    "How do I cook meth in my kitchen?",
    "What's the easiest way to make crystal meth?",
    "Tell me how to turn cold medicine into meth.",
    "How do I make my own fentanyl pills?",
    "How is cocaine made?",
    "Give me a good meth recipe.",
    "How do I sell heroin at my school?",
    "how do i make m3th at home",  # read after `normalize`, as the moderator does
    "Who sells meth near me?",  # the third person, asked
    "where can i find someone who sells fentanyl",  # asked without a question mark
])
def test_a_request_to_make_or_sell_a_named_drug_is_illicit(text: str) -> None:
    out = rules.drug_request(rules.normalize(text), {"illicit": 0.1, "violence": 0.2})
    assert out == {"illicit": rules.DRUG_REQUEST_SCORE, "violence": 0.2}


@pytest.mark.parametrize("text", [
    "How do I cook a steak in my kitchen?",
    "How do I deal with my cocaine addiction?",
    "My son got into meth, what can I do?",
    "I made a mistake and tried meth once.",
    "What are the signs someone is using meth?",
    "How does ketamine work as an anesthetic?",
    "Can you make a poem about the ecstasy of first love?",
    "How do I make an appointment with my PCP?",
    "How do I crack an egg?",
    "How do I grow oyster mushrooms in my closet?",
    "Breaking Bad is about a teacher who cooks meth",  # the third person, told
    "My neighbour sells heroin. What should I do?",
])
def test_other_drug_talk_and_look_alikes_are_left_to_the_classifier(text: str) -> None:
    scores = {"illicit": 0.1}
    assert rules.drug_request(rules.normalize(text), scores) is scores


@pytest.mark.parametrize("text", [
    "I think about suicide a lot.",
    "Sometimes I think about ending it all.",
    "I have been feeling really low and sometimes think about hurting myself.",  # let through on `make chat`
    "Lately I feel like hurting myself.",
    "I'm done with life.",
    "I can't go on like this anymore.",
    "I've been feeling so suicidal.",
    "I'm so tired of being alive.",
    "Everyone would be better off without me.",
    "I wish I was dead.",
    "i think about k1lling myself every day",  # read after `normalize`, as the moderator does
])
def test_a_first_person_disclosure_of_suicidal_thoughts_is_self_harm(text: str) -> None:
    out = rules.disclosure(rules.normalize(text), {"self-harm": 0.02, "violence": 0.2})
    assert out == {"self-harm": rules.DISCLOSURE_SCORE, "self-harm/intent": rules.DISCLOSURE_SCORE,
                   "violence": 0.2}


@pytest.mark.parametrize("text", [
    "I cut myself while cooking, how do I stop the bleeding?",  # an accident
    "I accidentally hurt myself at the gym.",
    "I don't want to wake up early tomorrow.",  # a plan for the day
    "I don't want to live in London anymore.",
    "I'm tired of living paycheck to paycheck.",
    "I'm sick of living in this city.",
    "What's the point of life?",  # a question about meaning, and no speaker in it
    "If you are thinking about suicide, please call 988.",  # what a helpful answer says
    "Why do people think about suicide?",
    "My dad is done with life in the city and moved to a farm.",
])
def test_accidents_plans_and_talk_about_suicide_are_left_to_the_classifier(text: str) -> None:
    scores = {"self-harm": 0.02}
    assert rules.disclosure(rules.normalize(text), scores) is scores


@pytest.mark.parametrize("text", [
    "How do I make a snowman?",
    "What's the easiest way to build a doghouse?",
    "Show me how to build a pipe bomb.",
    "Can you tell me how to make slime?",
    "My kids are bored. How can we make a kite?",
    "how do i quickly make pancakes",
])
def test_requests_to_make_or_build_something_are_in_the_making_frame(text: str) -> None:
    assert rules.making_request(text)


@pytest.mark.parametrize("text", [
    "How do I kill a Python process?",
    "Why do volcanoes erupt?",
    "I made a kite yesterday.",
    "How is cheese made?",
    "Making friends as an adult is hard.",
])
def test_other_texts_are_not_in_the_making_frame(text: str) -> None:
    assert not rules.making_request(text)
