"""RETROSPECT: reviewing a finished game's decisions."""

from mtg_core import ExpertInfo, LoraSettings, PackagedExpert

plugin = PackagedExpert(
    info=ExpertInfo(name="retrospect", description="Game analysis and decision review"),
    # Rank 8 (the seed's): a review reuses the rules the other experts know; the adapter learns the coach's
    # structure (decision point, what happened, better line, lesson). alpha = 2 x rank. Dropout 0.1: game
    # stories vary a lot in wording, so like EXPLAIN it gets more regularisation.
    lora=LoraSettings(rank=8, alpha=16, dropout=0.1),
    package=__package__,
    eval_prompts=[
        "For game 3 against a creature deck I sided out my counterspells, then lost to a single enchantment I had no answer for. How should I have sideboarded?",
        "In a three-player game I kept attacking the player with the most life, while the player at 8 quietly built an army and beat us both. Who should I have been attacking?",
        "I kept three lands and a sweeper against an aggro deck, took heavy damage before the sweeper, and lost despite casting it on time. Was the keep or my play the problem?",
    ],
)
