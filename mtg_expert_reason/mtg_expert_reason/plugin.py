"""REASON: step-by-step reasoning about rules and interactions, citing the Comprehensive Rules."""

from mtg_core import ExpertInfo, LoraSettings, PackagedExpert

plugin = PackagedExpert(
    info=ExpertInfo(name="reason", description="Logical reasoning for MTG rules and interactions"),
    # Rank 16 (the seed's): rules interactions are new knowledge, not just a tone. alpha = 2 x rank keeps
    # the update scale at 2.0 as in the QLoRA paper. Dropout 0.05, the lowest of the five: answers hinge on
    # exact rule numbers and step order, so we regularise least here.
    lora=LoraSettings(rank=16, alpha=32, dropout=0.05),
    package=__package__,
    eval_prompts=[
        "I attack with a 3/3 first striker; my opponent blocks with a 2/2 deathtouch creature. What happens?",
        "Humility and Opalescence are both on the battlefield. What are Humility's power and toughness?",
        "In response to my Lightning Bolt targeting their 2/2, my opponent casts Giant Growth on it. Does it survive?",
    ],
)
