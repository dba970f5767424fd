"""The word banks and templates the sentiment task's data are generated from.

Response templates have slots: ``P`` a predicative adjective that may be negated ("is not
boring"), ``Q`` a predicative adjective, ``B`` an attributive adjective with its article
("a quiet"), ``V`` a first-person verb, ``D`` a sentence adverb. Topic agreement comes from
``{be}`` (is/are), ``{has}`` (has/have), ``{it}`` (it/they), ``{them}`` (it/them) and ``{s}``
(the third-person verb ending).
"""

from __future__ import annotations

SINGULAR_TOPICS = """
coffee|tea|the ocean|the desert|the forest|a small village|the city library|the local market|
the morning commute|the weekend|winter|summer|autumn|spring rain|a mountain trail|the river|
a train station|the airport|a school cafeteria|a bookshop|a museum|the park|the beach|
a thunderstorm|the night sky|a garden|the kitchen|a bakery|a farm|a bus ride|a lighthouse|
a lake|an old house|a snowy street|the harbor|a corner cafe|a football match|a concert|
a piano lesson|a science fair|the first day of school|a birthday party|a family dinner|
a rainy afternoon|a long flight|a road trip|a camping trip|homework|the office|
a job interview|a waiting room|a traffic jam|the subway|a grocery store|a laundromat|
a small apartment|the neighborhood|a city square|a stone bridge|a castle|a zoo|an aquarium|
a playground|a swimming pool|a gym|a picnic|a fishing boat|a sunrise|a sunset|the moon|
a cup of cocoa|vegetable soup|fresh bread|pizza|a chess game|a jigsaw puzzle|a painting|
a poem|an old song|a film|a novel|a notebook|a typewriter|a clock tower|an island|a valley|
a waterfall|a meadow|a vineyard|a greenhouse|a workshop|a post office|a ferry|a tram|
a marathon|a classroom|a tennis match|an orchard|a canal|a fire station|a radio show|
the countryside|the city at night
"""

PLURAL_TOPICS = """
cats|dogs|birds|trains|old bicycles|board games|rainy mornings|long walks|city parks|
public libraries|mountains|houseplants|school holidays|paper maps|street musicians|
farmers markets|snowflakes|sunflowers|bees|horses|rivers|lighthouses|old photographs|
handwritten letters|museums|bookshelves|kites|buses|tall buildings|quiet evenings|
Monday mornings|family recipes
"""

PROMPT_TEMPLATES = (
    "Write one sentence about {t}.",
    "Describe {t} in one sentence.",
    "Write a short sentence about {t}.",
    "In one sentence, tell me about {t}.",
    "Say something about {t} in a single sentence.",
)

RESPONSE_TEMPLATES = (
    "{T} {be} {P1}, and spending an afternoon with {them} feels {P2}.",
    "Many people find {t} {Q1}, especially on {B1} morning.",
    "{T} {be} {P1} in a way that makes an ordinary day feel {Q2}.",
    "I {V1} {t} because {it} always seem{s} {P1} to me.",
    "There is something {Q1} about {t} that makes the whole week feel {P2}.",
    "{T} {has} {B1} rhythm, and most visitors describe {them} as {Q1}.",
    "Whenever I think about {t}, I feel {P1} and a little {Q2}.",
    "People often call {t} {Q1}, and after {B1} visit I would agree.",
    "{T} can be {P1} and {P2} at the same time, depending on the day.",
    "Spending {B1} hour with {t} is usually {P1} for me.",
    "Most days, {t} feel{s} {P1}, and the memories stay {Q2}.",
    "My friends {V1} {t}, and they say {it} {be} {P1}.",
    "{T} {be} {B1} part of life that most people find {Q1}.",
    "Learning about {t} was {P1}, and the details turned out to be {P2}.",
    "To me, {t} {be} {P1}, like {B1} song that plays in the background.",
    "{T} always make{s} the afternoon feel {Q1} and {Q2}.",
    "{D1}, {t} {be} {P1} most of the time.",
    "{D1}, a visit to {t} is {P1}, and the rest of the day feels {Q2}.",
    "Children usually find {t} {Q1}, while adults call {them} {Q2}.",
    "I {V1} the way {t} make{s} {B1} street feel {Q1}.",
    "After a long week, {t} feel{s} {P1} and {Q2}.",
    "Every time I visit {t}, the experience is {P1} and {Q2}.",
    "{T} {be} {P1}, and I {V1} how {it} change{s} with the seasons.",
    "The story of {t} is {P1}, and people tell it in {B1} voice.",
)

ADJECTIVES = {
    "++": "wonderful amazing fantastic excellent brilliant magnificent marvelous splendid "
    "gorgeous delightful extraordinary breathtaking enchanting glorious spectacular stunning "
    "heavenly magical",
    "+": "pleasant lovely enjoyable charming cheerful peaceful relaxing comforting refreshing "
    "inspiring uplifting interesting fascinating rewarding satisfying calm warm friendly cozy "
    "bright lively graceful elegant welcoming soothing beautiful nice good great fun "
    "meaningful wholesome hopeful vibrant serene tranquil",
    "0": "ordinary familiar common typical simple plain regular usual predictable routine "
    "modest steady moderate quiet busy traditional practical straightforward average standard "
    "normal different noticeable measured consistent orderly seasonal gradual formal local",
    "-": "boring dull tedious dreary gloomy tiring exhausting annoying frustrating stressful "
    "unpleasant uncomfortable awkward confusing noisy messy bland bleak dismal drab monotonous "
    "disappointing depressing lonely tense irritating pointless mediocre tiresome",
    "--": "terrible awful horrible dreadful miserable unbearable disgusting appalling "
    "atrocious hideous",
}

VERBS = {
    "++": "love adore",
    "+": "enjoy appreciate admire cherish",
    "0": "notice remember know study",
    "-": "dislike dread resent",
    "--": "hate despise",
}

ADVERBS = {
    "++": "Wonderfully Delightfully",
    "+": "Happily Fortunately Luckily Thankfully",
    "0": "Usually Generally Often Typically Mostly Sometimes",
    "-": "Sadly Unfortunately Regrettably",
    "--": "Terribly Miserably",
}

INTENSIFIERS = ("very", "really", "truly")

ARTICLE_EXCEPTIONS = frozenset({"usual", "useful", "unique", "one"})


def topics() -> list[tuple[str, bool]]:
    """Every topic as ``(phrase, plural)``."""
    singular = [t.strip() for t in SINGULAR_TOPICS.replace("\n", "").split("|")]
    plural = [t.strip() for t in PLURAL_TOPICS.replace("\n", "").split("|")]
    return [(t, False) for t in singular] + [(t, True) for t in plural]


def article(word: str) -> str:
    """``a`` or ``an`` before ``word``."""
    vowel = word[0] in "aeiou" and word not in ARTICLE_EXCEPTIONS
    return "an" if vowel else "a"
