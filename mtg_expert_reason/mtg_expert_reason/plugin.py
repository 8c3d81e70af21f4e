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
        "After blockers, I give trample to my 2/2 that a 1/1 is blocking; the 2/2 is attacking a Siege. How much damage goes to the Siege?",
        "I copy a spell whose X was 3 and whose extra cost was discarding a card. Must I discard again for the copy, and what is the copy's X?",
        "My opponent takes an extra turn while my 'until your next turn' effect is active. Does my effect end during their extra turn?",
    ],
)
