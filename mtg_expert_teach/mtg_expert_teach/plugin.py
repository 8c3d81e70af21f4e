"""TEACH: patient lessons for people learning the game."""

from mtg_core import ExpertInfo, LoraSettings, PackagedExpert

plugin = PackagedExpert(
    info=ExpertInfo(name="teach", description="Educational content for learning the game"),
    # Rank 8 (the seed's): teaching mostly changes voice and pacing over basics the base already knows,
    # so half the capacity suffices. alpha = 2 x rank keeps the same update scale as the rank-16 experts.
    # Dropout 0.05: beginner material is short and consistent in style.
    lora=LoraSettings(rank=8, alpha=16, dropout=0.05),
    package=__package__,
    eval_prompts=[
        "I just started playing. What is a mana curve and why should I care?",
        "What's the difference between an instant and a sorcery?",
        "How does blocking work in combat?",
    ],
)
