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
        "I attacked with everything and my opponent flashed in a blocker and swung back for lethal. What went wrong?",
        "I kept a one-land seven on the draw and lost without casting a spell. Was the keep wrong?",
        "I used my only removal on their mana elf on turn 1 and then lost to a big flyer. Was that a mistake?",
    ],
)
