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
        "Some of my cards say 'Cycling {2}'. What does cycling do, and when should I cycle a card rather than keep it?",
        "My deck makes Treasure tokens. What are they, and why do people say they help you ramp?",
        "What does proliferate mean, and which counters does it add to?",
    ],
)
