"""PREDICT: game-state and probability analysis."""

from mtg_core import ExpertInfo, LoraSettings, PackagedExpert

plugin = PackagedExpert(
    info=ExpertInfo(name="predict", description="Game state and probability analysis"),
    # Rank 16 (the seed's): hypergeometric arithmetic and combat maths are skills, not tone. alpha = 2 x rank.
    # Dropout 0.05: numbers must come out exact, so regularisation stays low, as for REASON.
    lora=LoraSettings(rank=16, alpha=32, dropout=0.05),
    package=__package__,
    eval_prompts=[
        "I run 8 Mountains and 9 Forests in a 40-card deck. How likely is it that I can pay {R}{R} on turn 3 when I'm going second?",
        "The opponent sits at 13 behind two untapped 2/2s. I swing with a 5/5 trampler, a 4/4 and a 1/1. How much damage is guaranteed to reach them?",
        "My opponent holds 2 unknown cards; 45 of their cards are unseen, including 5 instant-speed removal spells. What are the odds my freshly cast creature survives their next turn?",
    ],
)
