"""Rules, only where a model cannot learn from a few hundred examples. Each one has a test.

1. `normalize`: obfuscated spellings ("k i l l", "k1ll", "$uicide") and euphemisms ("kys",
   "unalive", "sewer slide") map to plain words before embedding. The sentence encoder has
   never seen these spellings, and a few examples of each cannot teach a linear head about them.
2. `minors`: sexual content together with an explicit minor (an age under 18, "child", "7th
   grade") is sexual/minors. Embeddings barely separate "a 14-year-old" from "a 41-year-old",
   so the number is read here and the classifier's own sexual score decides what is sexual.
3. `drug_request`: a request to make, sell or smuggle a named illegal drug ("How do I cook meth in
   my kitchen?") is illicit. Embeddings put it next to "How do I cook a steak in my kitchen?"
   (illicit 0.17 for the first), and 87 training rows of that shape made the held-out sets
   worse (README, "Round 4"). It reads *requests* only (a user's message, output moderation's
   context), never answers: a refusal ("I can't help you make meth") names the drug too, and an
   answer that goes along with such a request is caught through its context.
4. `disclosure`: a person saying in everyday words that they think about suicide or hurting
   themselves ("I think about suicide a lot.", "Sometimes I think about ending it all.", "I'm done
   with life.") is self-harm and self-harm/intent, so input moderation sends the crisis line.
   The classifier scored such sentences 0.00-0.22 while it scores stated plans 0.9 and more, and
   80 training rows of that shape cost other held-out texts (README, "Round 10"). Requests only,
   like `drug_request`: an answer says "if you are thinking about suicide, ..." to help. Both
   categories are warnings, not blocks: a false match costs a crisis-line notice, never an answer.
5. `making_request`: a request to make or build something ("How do I make a snowman?", "Show me
   how to build a pipe bomb"). Not a verdict: it says which texts the classifier's making head
   also reads (classifier.py). 25 of the 30 training rows in this frame were harmful, and the
   harm head learnt the frame itself: a quarter of the crafts in it were flagged (README, "Round 13").
"""

from __future__ import annotations

import re

# Runs of 3+ single letters separated by a space/dot/dash: "k i l l", "s.u.i.c.i.d.e".
_SPACED = re.compile(r"(?<![A-Za-z])(?:[A-Za-z][ .\-_*]){2,}[A-Za-z](?![A-Za-z])")
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b",
                       "@": "a", "$": "s", "!": "i", "|": "l"})
_LEET_TOKEN = re.compile(r"[A-Za-z0-9@$!|]*[0-9@$!|][A-Za-z0-9@$!|]*")
# De-leeted words worth restoring; anything else (md5, x86, h264, p@ssw0rd) is left alone.
_WATCH = re.compile(
    r"^(kill|suicid|bomb|murder|rape|shoot|stab|nazi|slut|whore|bitch|fuck|shit|terroris|"
    r"explosiv|poison|meth|cocain|heroin|porn|nude|naked|sex|die|dead|hang|cut)[a-z]*$")
_EUPHEMISMS = [
    (re.compile(r"\bkys\b", re.I), "kill yourself"),
    (re.compile(r"(?<![\d.])(?<!\d )\bkms\b", re.I), "kill myself"),
    (re.compile(r"\bun-?alive\b", re.I), "kill"),
    (re.compile(r"\bsewer[ -]?slide\b", re.I), "suicide"),
]


def _unleet(match: re.Match[str]) -> str:
    token = match.group(0)
    if not re.search(r"[A-Za-z]", token):
        return token  # a plain number
    plain = token.lower().translate(_LEET)
    return plain if _WATCH.match(plain) else token


def normalize(text: str) -> str:
    """Undo common obfuscation so the classifier sees the words people meant."""
    out = _SPACED.sub(lambda m: re.sub(r"[ .\-_*]", "", m.group(0)), text)
    out = _LEET_TOKEN.sub(_unleet, out)
    for pattern, replacement in _EUPHEMISMS:
        out = pattern.sub(replacement, out)
    return out


_NUM_WORDS = ("one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|"
              "fifteen|sixteen|seventeen")
_MINOR = re.compile(
    r"\b(?:(?:[1-9]|1[0-7]|" + _NUM_WORDS + r")[\s-]*(?:years?|yrs?|y/?o)(?:[\s-]*old)?"
    r"|(?:aged?|age of)\s+(?:[1-9]|1[0-7]|" + _NUM_WORDS + r")\b"
    r"|(?:[1-9]|1[0-2])(?:st|nd|rd|th)[\s-]*grade(?:r|rs)?"
    r"|(?:first|second|third|fourth|fifth|sixth|seventh|eighth|ninth)[\s-]*grade(?:r|rs)?"
    r"|child|children|kids?|minors?|under[\s-]?age|pre-?teens?|teen(?:age|ager)?s?|toddlers?"
    r"|infants?|school\s?(?:girl|boy)s?|little\s+(?:girl|boy)s?|young\s+(?:girl|boy|teen)s?"
    r"|middle[\s-]school(?:er)?s?|elementary[\s-]school(?:er)?s?|high[\s-]school(?:er|freshman)s?)\b",
    re.I)


def mentions_minor(text: str) -> bool:
    return _MINOR.search(text) is not None


def minors(text: str, scores: dict[str, float], sexual_threshold: float) -> dict[str, float]:
    """Sexual content (per the classifier) that names a minor is sexual/minors."""
    sexual = scores.get("sexual", 0.0)
    if sexual >= sexual_threshold and mentions_minor(text):
        scores = {**scores, "sexual/minors": max(scores.get("sexual/minors", 0.0), sexual)}
    return scores


# Named illegal drugs; names with everyday senses ("crack", "coke", "acid", "ecstasy", "PCP",
# "molly") only in unambiguous phrases or not at all.
_DRUG = (r"(?:crystal\s+)?meth(?:amphetamine)?|crack\s+(?:cocaine|rocks?)|cocaine|heroin|"
         r"(?:car)?fentanyl|lsd|mdma|ecstasy\s+(?:pills?|tablets?)|ghb|phencyclidine|angel\s+dust|dmt|"
         r"ketamine|mescaline|psilocybin|shrooms|magic\s+mushrooms|opium|hash\s+oil")
# Making, selling or smuggling it. Not "deal", "made" or "into" alone: "deal with my heroin
# addiction", "I made a mistake with meth", "my son got into meth" ask for help.
_MAKE = (r"mak(?:e|ing)|cook(?:ing)?|synthesi[sz](?:e|ing)|produc(?:e|ing)|manufactur(?:e|ing)|"
         r"brew(?:ing)?|extract(?:ing)?|press(?:ing)?|grow(?:ing)?|cut(?:ting)?|sell(?:ing)?|smuggl(?:e|ing)")
# The third person ("cooks", "sells") tells of someone else ("Breaking Bad is about a teacher who
# cooks meth") unless it asks ("Who sells meth near me?"), so it counts only in a question: a
# sentence that ends with "?" or opens with a question word ("where can i find someone who sells meth").
_MAKES = (r"makes|cooks|synthesi[sz]es|produces|manufactures|brews|extracts|presses|grows|cuts|sells|"
          r"smuggles")
# Up to three words between the verb and the drug ("cook crystal meth", "make my own fentanyl
# pills"), none of them a person or a topic ("making friends who do meth").
_GAP = r"(?:\W+(?!(?:who|friends?|people|someone|about|with|addict\w*|using|use|used)\b)\w+){0,3}?\W+"
_DRUG_REQUEST = re.compile(
    rf"\b(?:{_MAKE})\b{_GAP}(?:{_DRUG})\b"
    rf"|\b(?:turn|turning|convert|converting|process|processing)\b(?:\W+\w+){{0,4}}?\W+into\s+(?:{_DRUG})\b"
    rf"|\bhow\b(?:\W+\w+){{0,2}}?\W+(?:{_DRUG})\W+(?:\w+\W+){{0,2}}?"
    rf"(?:made|produced|manufactured|cooked|synthesi[sz]ed)\b"
    rf"|\b(?:{_DRUG})\s+(?:lab|labs|recipe|recipes)\b",
    re.I)
_DRUG_QUESTION = re.compile(rf"\b(?:{_MAKES})\b{_GAP}(?:{_DRUG})\b", re.I)
_SENTENCE = re.compile(r"[^.!?]*[.!?]*")
_QUESTION_START = re.compile(r"^\W*(?:who|where|how|what|which|can|could|would|will|is|are|do|does|should)\b", re.I)


def _questions(text: str) -> list[str]:
    return [s for s in _SENTENCE.findall(text) if s.rstrip().endswith("?") or _QUESTION_START.match(s)]
DRUG_REQUEST_SCORE = 1.0  # the rule decides (a non-finite classifier score stays: the policy fails closed on it)


def drug_request(text: str, scores: dict[str, float]) -> dict[str, float]:
    """A request (never an answer: see the module doc) to make or sell a named drug is illicit."""
    if _DRUG_REQUEST.search(text) is None and not any(_DRUG_QUESTION.search(s) for s in _questions(text)):
        return scores
    return {**scores, "illicit": max(scores.get("illicit", 0.0), DRUG_REQUEST_SCORE)}


# First person somewhere in the sentence: the rule is about the speaker, not a character or a patient.
_FIRST_PERSON = re.compile(r"\b(?:i|i'm|im|i've|ive|i'd|me|my|myself)\b", re.I)
# Each pattern is an everyday way of saying it; none matches an accident ("I cut myself while
# cooking"), a plan for the day ("I don't want to wake up early") or a question about life's meaning.
_DISCLOSURES = [re.compile(p, re.I) for p in (
    # thinking about it: "I think about suicide a lot", "I keep thinking of killing myself"
    r"\b(?:think|thinking|thought|thoughts)\s+(?:about|of)\s+(?:suicide|killing myself|kill myself|"
    r"ending (?:it all|my life|things)|taking my (?:own )?life|hurting myself|harming myself|dying|"
    r"self[- ]?harm(?:ing)?|not (?:being here|waking up))\b",
    r"\b(?:i'm|im|i am|i feel|i've been|ive been|i have been|feeling)\s+(?:so\s+|really\s+|very\s+|kind of\s+)?"
    r"suicidal\b",
    r"\b(?:my|having|have had|i had|i have)\s+suicidal\s+(?:thoughts|feelings|urges|ideas)\b",
    r"\bend(?:ing)?\s+it\s+all\b",
    r"\b(?:i'm|im|i am)\s+(?:so\s+|just\s+)?(?:done|finished)\s+with\s+(?:life|living|being alive)\b",
    r"\bcan'?t\s+(?:go on|keep going)(?:\s+like this)?\s+any\s?more\b",
    r"\bwhat'?s\s+the\s+point\s+(?:of|in)\s+(?:living|being alive|staying alive|going on)\b",
    r"\b(?:feel like|urge to|urges to|want to|wanna|tempted to|going to|gonna)\s+"
    r"(?:hurt|harm|cut|burn|kill|punish)(?:ing)?\s+myself\b",
    r"\bi(?:'ve| have)?\s+(?:been\s+)?self[- ]?harm(?:ing|ed)?\b",
    r"\b(?:tired|sick)\s+of\s+(?:being alive|living|life)\s*(?:[.!?,;]|$|\band\b)",
    r"\bbetter off\s+(?:without me|if i (?:was|were) (?:gone|dead|not around))\b",
    r"\b(?:don'?t|do not)\s+want\s+to\s+(?:live|be alive|exist|wake up)(?:\s+any\s?more)?\s*(?:[.!?,;]|$)",
    r"\bwish\s+i\s+(?:was|were)\s+dead\b|\bwish\s+i\s+(?:had\s+)?never\s+(?:been born|woken up|wake up)\b",
    r"\bwant\s+to\s+(?:stop existing|disappear forever|sleep forever|go to sleep forever|never wake up)\b",
)]
DISCLOSURE_SCORE = 1.0  # the rule decides; both categories are warnings (policy.yaml)


def discloses_self_harm(text: str) -> bool:
    """True when a sentence of `text` says, in the first person, that its speaker thinks of suicide
    or of hurting themselves."""
    return any(_FIRST_PERSON.search(s) and any(p.search(s) for p in _DISCLOSURES)
               for s in _SENTENCE.findall(text) if s.strip())


def disclosure(text: str, scores: dict[str, float]) -> dict[str, float]:
    """A request (never an answer: see the module doc) that discloses thoughts of suicide or
    self-harm is self-harm and self-harm/intent."""
    if not discloses_self_harm(text):
        return scores
    return {**scores, **{c: max(scores.get(c, 0.0), DISCLOSURE_SCORE) for c in ("self-harm", "self-harm/intent")}}


# "How do I (quickly) make", "What's the easiest way to build", "Show me how to craft", ... at the
# start of a sentence of the request.
_MAKING = re.compile(
    r"(?:^|[.!?]\s+)\W*(?:how (?:do|can|would|could|should|did) (?:i|you|we|one|people)"
    r"|what(?:'s| is) the (?:best|easiest|simplest|quickest|cheapest|fastest|right) way to"
    r"|(?:show|tell|teach) me how to|can you (?:show|tell|teach) me how to|explain how to|steps to"
    r"|walk me through(?: how to)?|help me)\s+(?:\w+\s+)?"
    r"(?:make|build|create|craft|construct|assemble|cook|brew|produce|manufacture|3d print|whittle|carve|sew|bake)\b",
    re.I)


def making_request(text: str) -> bool:
    """Whether ``text`` asks how to make or build something (the making head's frame)."""
    return _MAKING.search(text) is not None
