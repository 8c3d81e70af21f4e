"""EXPLAIN: clear explanations of rules for players."""

from mtg_core import ExpertInfo, LoraSettings, PackagedExpert

plugin = PackagedExpert(
    info=ExpertInfo(name="explain", description="Clear rule explanations for players"),
    # Rank 16 as the seed says, alpha = 2 x rank like every expert here. Dropout 0.1, twice REASON's (the
    # seed's "higher dropout"): explanations restate the same rules in many wordings, and with a small
    # data set more dropout keeps the adapter from memorising one phrasing.
    lora=LoraSettings(rank=16, alpha=32, dropout=0.1),
    package=__package__,
    eval_prompts=[
        "If both players would lose the game at exactly the same moment, who wins?",
        "Can I respond when my opponent cycles a card, and what is actually on the stack at that point?",
        "Once I've declared my attackers, can I add another creature to the attack later in combat?",
    ],
)
