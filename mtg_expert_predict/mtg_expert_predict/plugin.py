"""PREDICT: game-state and probability analysis."""

from mtg_core import ExpertInfo, LoraSettings, PackagedExpert

plugin = PackagedExpert(
    info=ExpertInfo(name="predict", description="Game state and probability analysis"),
    # Rank 16 (the seed's): hypergeometric arithmetic and combat maths are skills, not tone. alpha = 2 x rank.
    # Dropout 0.05: numbers must come out exact, so regularisation stays low, as for REASON.
    lora=LoraSettings(rank=16, alpha=32, dropout=0.05),
    package=__package__,
    eval_prompts=[
        "My 60-card deck runs 24 lands. What is the chance my opening seven has at least two lands?",
        "My opponent is at 7 life with no blockers; I have two 3/3s and a Lightning Bolt in hand. Is it lethal?",
        "In a 40-card Limited deck with 17 lands, how likely am I to have hit my fourth land drop on turn 4 on the play?",
    ],
)
