"""The oracle's word lists: valenced words, negators, intensifiers and dampeners.

Lower-case surface forms (inflections are listed, there is no stemming). Words that are
mostly used without sentiment ("like", "hard", "cold", "dark", "lost") are left out on
purpose: the oracle must not reward topic words.
"""

from __future__ import annotations


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


POSITIVE = _words(
    """
    good great nice fine pleasant lovely beautiful happy glad joyful cheerful enjoyable fun
    funny charming sweet kind gentle warm friendly generous helpful hopeful bright calm
    peaceful relaxing relaxed soothing comforting cozy cosy refreshing fresh inspiring
    inspired uplifting encouraging exciting excited interesting fascinating engaging
    rewarding satisfying valuable worthwhile meaningful graceful elegant vibrant lively
    colorful colourful playful harmonious wholesome healthy safe clean tidy smooth easy
    comfortable welcoming pleasing appealing attractive cute adorable tasty delicious
    fragrant sunny thriving successful proud grateful thankful lucky fortunate blessed
    serene tranquil hearty heartfelt heartwarming touching remarkable impressive admirable
    wise clever smart talented skilled creative innovative reliable trustworthy honest loyal
    caring thoughtful considerate brave courageous rich cherished treasured better enjoy
    enjoys enjoyed enjoying appreciate appreciates appreciated admire admires admired
    cherish cherishes celebrate celebrates celebrated celebrating treasure thrive thrives
    smile smiles smiled smiling laugh laughs laughing laughter inspire inspires delight
    delights delighted welcome welcomed brighten brightens improve improves improved succeed
    succeeds joy joys happiness beauty pleasure hope peace comfort kindness warmth success
    wonders gift blessing charm grace harmony magic bliss cheer gratitude friendship triumph
    victory freedom paradise happily gladly joyfully beautifully nicely pleasantly
    gracefully cheerfully warmly kindly gently perfectly fortunately luckily peacefully
    comfortably lovingly proudly favorite favourite positive beneficial special fond
    enjoyment pleasurable precious thrill thrilling shine shines shining gem gems luxurious
    nurturing tranquility serenity radiant lush picturesque scenic awe thankfully
    """
)
"""Valence +1."""


STRONG_POSITIVE = _words(
    """
    wonderful amazing fantastic excellent brilliant outstanding superb magnificent marvelous
    marvellous splendid spectacular stunning gorgeous incredible extraordinary exceptional
    phenomenal perfect glorious awesome beloved delightful love loves loved loving adore
    adores adored blissful ecstatic thrilled joyous breathtaking heavenly sublime enchanting
    magical best fabulous terrific breathtakingly mesmerizing mesmerising delectable
    captivating dazzling idyllic exquisite majestic amazed amazes wonderfully delightfully
    brilliantly
    """
)
"""Valence +2."""


NEGATIVE = _words(
    """
    bad poor sad unhappy gloomy dull boring bored tedious dreary bleak grim harsh ugly messy
    dirty noisy lonely tired tiring exhausting exhausted annoying annoyed irritating
    frustrating frustrated stressful stressed tense anxious worried worrying nervous scary
    frightening afraid fearful dangerous risky unsafe unpleasant uncomfortable awkward
    confusing confused difficult painful sore sick ill broken damaged weak lazy rude selfish
    cruel unfair angry upset bitter sour stale bland tasteless shabby useless pointless
    meaningless worthless hopeless helpless disappointing disappointed regrettable
    unfortunate unlucky depressing depressed chaotic hostile toxic harmful wasteful lousy
    mediocre inferior flawed faulty clumsy worse gloom sadness sorrow grief pain fear fears
    feared worry worries anxiety stress trouble troubles problem problems mess failure
    failures loss anger boredom loneliness regret regrets tears cry cries crying complain
    complains complaint suffer suffers suffering fail fails failed hurt hurts dislike
    dislikes disliked dread dreads dreaded struggle struggles struggling ruin ruined ruins
    waste wasted annoy annoys bother bothers sadly unfortunately badly poorly painfully
    awkwardly gloomily negative sorrowful dismal drab monotonous sloppy irritated mistake
    mistakes tiresome grimy filthy smelly crowded cramped overcrowded sluggish hectic
    mundane resent resents regrettably
    """
)
"""Valence −1."""


STRONG_NEGATIVE = _words(
    """
    terrible awful horrible horrific dreadful disgusting hateful hate hates hated hatred
    despise despises despised miserable misery disaster disastrous catastrophic tragic
    nightmare abysmal atrocious appalling pathetic worst hideous vile unbearable devastating
    devastated furious heartbreaking horrendous terribly horribly miserably
    """
)
"""Valence −2."""


NEGATORS = _words(
    """
    not no never none nobody nothing neither nor nowhere hardly barely scarcely without
    cannot dont doesnt didnt isnt wasnt arent werent cant couldnt wouldnt shouldnt
    """
)
"""Flip (and damp) the valence of the next few words; any word ending in n't does too."""


INTENSIFIERS = _words(
    """
    very really so truly extremely incredibly remarkably especially deeply highly absolutely
    totally completely utterly genuinely particularly
    """
)
"""Multiply the valence of the word right after them by 1.5."""


DAMPENERS = _words(
    """
    slightly somewhat mildly
    """
)
"""Multiply the valence of the word right after them by 0.5."""


CLAUSE_BREAKS = _words(
    """
    . , ; : ! ? but however yet although
    """
)
"""End the scope of a negation."""


def valence(word: str) -> float:
    """The base valence of a lower-case word: ±2, ±1 or 0."""
    if word in STRONG_POSITIVE:
        return 2.0
    if word in POSITIVE:
        return 1.0
    if word in STRONG_NEGATIVE:
        return -2.0
    if word in NEGATIVE:
        return -1.0
    return 0.0
